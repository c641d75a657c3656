"""Optimal ablation (OA; Li & Janson 2024, "Optimal ablation for interpretability"; MIB's `oa.py`):
for every node, the constant value that minimises the expected loss when that node is ablated to it.

For every sender s (the input embedding, each head's output, each MLP's output) OA learns
c_s in R^d_model solving

    c_s* = argmin_c  E_x [ L(M_{s <- c}(x)) ]

where M_{s <- c} is the model with s's output replaced by c at every position (in the graph form,
every receiver reads c instead of s: row s of the `EdgePatch` weights is 0) and L is

- "lm": the next-token cross-entropy at every real position of the clean prompts, in nats per token
  (what MIB's `oa.py` minimises), or
- "kl": KL(clean model || ablated model) at every real position, in nats per token (Li & Janson's
  ablation loss, which needs no labels).

The c_s start at the mean sender output (`ablation.compute_means`), so step 0 is mean ablation, and
are trained with Adam (optax) on the clean prompts of the dataset. Each c_s enters only its own
loss, so one Adam over the stacked [n_senders, d_model] values is n_senders independent
optimisations, as MIB runs them (one optimizer per component). Training stops after `steps`, or
when the mean loss of `check_every` steps has not improved `patience` times in a row (MIB's early
stop, on a less noisy loss).

`--intervention=optimal` then ablates a sender (or an edge) to c_s (`ablation.Optimal(c)`), in
attribution and in circuit evaluation alike. Of the attribution modules this one imports only
`base`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxinterp.attribution import base
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import (
    LayerStart,
    embed_inputs,
    forward,
    layers_uniform,
    run_blocks,
    stack_blocks,
)
from jaxinterp.runtime import distributed, files
from jaxinterp.tasks import Batch, Dataset

OBJECTIVES = ("lm", "kl")
RUN_DIR = "optimal_ablation"  # where find_circuit saves a run's learned constants, in --out
VALUES_DIR = "values"
META_FILE = "optimal_ablation.json"
FORMAT = "jaxinterp-optimal-ablation-1"


@dataclasses.dataclass(frozen=True)
class OptimalOptions(base.Options):
  """How the optimal-ablation constants are trained.

  Attributes:
    oa_steps: at most this many Adam steps (one batch each, cycling through the dataset).
    oa_lr: Adam's learning rate (MIB: 1e-3).
    oa_objective: "lm" (next-token cross-entropy, MIB) or "kl" (KL to the clean model).
    oa_batch: examples per step.
    oa_check_every, oa_patience: stop when the mean loss over `oa_check_every` steps has not
      improved for `oa_patience` checks in a row (0 disables early stopping).
    oa_chunk: senders per vmapped forward (None: `oa_chunk_size`, all of them at once where their
      activations fit a quarter of the device's memory). Fewer bound the memory: each chunk's
      forward runs again in the backward pass, so one chunk's activations are kept.
  """

  oa_steps: int = 1000
  oa_lr: float = 1e-3
  oa_objective: str = "lm"
  oa_batch: int = 16
  oa_check_every: int = 10
  oa_patience: int = 3
  oa_chunk: int | None = None

  def __post_init__(self):
    super().__post_init__()
    for name in ("oa_steps", "oa_batch", "oa_check_every"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise base.AttributionError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(self.oa_patience, bool) or not isinstance(self.oa_patience, int) \
        or self.oa_patience < 0:
      raise base.AttributionError(f"oa_patience must be a non-negative integer, got "
                                  f"{self.oa_patience!r}")
    if self.oa_chunk is not None and (not isinstance(self.oa_chunk, int) or self.oa_chunk < 1):
      raise base.AttributionError(f"oa_chunk must be a positive integer, got {self.oa_chunk!r}")
    if not (isinstance(self.oa_lr, (int, float)) and self.oa_lr > 0):
      raise base.AttributionError(f"oa_lr must be positive, got {self.oa_lr!r}")
    if self.oa_objective not in OBJECTIVES:
      raise base.AttributionError(f"oa_objective must be one of {OBJECTIVES}, got "
                                  f"{self.oa_objective!r}")


def _token_losses(objective: str, logits, clean_logits, batch: Batch):
  """Sum over real next-token positions of the per-token loss, and their count (scalars)."""
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  w = (batch.mask[:, 1:] & batch.mask[:, :-1] & batch.valid[:, None]).astype(jnp.float32)
  if objective == "lm":
    tok = -jnp.take_along_axis(lp, batch.clean[:, 1:, None], -1)[..., 0]
  else:
    lq = jax.nn.log_softmax(clean_logits[:, :-1].astype(jnp.float32), -1)
    tok = jnp.sum(jnp.exp(lq) * (lq - lp), -1)
  return jnp.sum(tok * w), jnp.sum(w)


def oa_chunk_size(cfg: ModelConfig, batch_size: int, n_pos: int,
                  budget_bytes: float | None = None) -> int:
  """Senders per vmapped ablation forward whose activations fit `budget_bytes` (default
  `base.chunk_budget_bytes()`): every sender when they all fit (one `vmap`, the fastest), else as
  many as fit, at least one.

  Each sender's forward and backward keeps, in float32, per position of each row: per layer the
  residual stream, norms, q/k/v, attention pattern and MLP activations and the per-head outputs
  its replaced site needs (`10 d + 3 d_mlp + 2 H pos + 2 H d`), and the full-vocabulary logits,
  their log-softmax and gradients (`4 V`). Measured on the GPT-2 small shape (4 rows of 21 tokens)
  193 MB a sender against 212 MB planned.
  """
  if budget_bytes is None:
    budget_bytes = base.chunk_budget_bytes()
  per_layer = base.block_floats_per_position(cfg, n_pos) + 2 * cfg.n_heads * cfg.d_model
  per_sender = 4.0 * batch_size * n_pos * (per_layer * cfg.n_layers + 4 * cfg.d_vocab)
  return int(max(1, min(E.n_senders(cfg), budget_bytes // per_sender)))


@functools.partial(jax.jit, static_argnames=("cfg", "objective", "chunk"))
def sender_losses(cfg: ModelConfig, objective: str, chunk: int | None, params, batch: Batch,
                  values):
  """Mean per-token loss with each sender alone ablated to its constant: Float[Array, "sender"].

  values: Float[Array, "sender d_model"]. One forward per sender (`vmap`, `chunk` at a time; None:
  `oa_chunk_size` of the batch's shape), with that sender's output replaced by its constant
  (`ablated_logits`).
  """
  sums, count = _sender_sums(cfg, objective, chunk, params, batch, values)
  return sums / jnp.maximum(count, 1.0)


@flax.struct.dataclass
class _Replace:
  """x -> value where `where` (broadcast against x), else x."""

  value: jax.Array
  where: jax.Array

  def __call__(self, x):
    return jnp.where(self.where, self.value.astype(x.dtype), x)


def node_form(cfg: ModelConfig) -> bool:
  """Whether a sender's ablation runs as the plain forward with that node's output replaced
  (`ablated_logits`): every config without post-norms. With post-norms a head's sender value is
  its share of the normed layer output, which no site of the plain forward holds: those keep the
  graph form (`ablated_logits_graph`)."""
  return not cfg.post_norms


def ablated_logits(cfg: ModelConfig, params, stacked, batch: Batch, values, s, emb) -> jax.Array:
  """The logits (Float[Array, "batch pos vocab"]) with sender `s` (traced) ablated to its constant
  `values[s]` at every position: the plain forward, replacing the input node's output `emb`
  (`embed_inputs`), head s's `attn.hook_result` or MLP s's `hook_mlp_out`. Every receiver
  downstream of s reads the residual stream, so this is the graph form with row s of the edge
  weights at 0 (`ablated_logits_graph`), without its per-receiver inputs. The blocks run as one
  `lax.scan` over `stacked` (`stack_blocks`; None: one after the other)."""
  L, H = cfg.n_layers, cfg.n_heads
  heads = jnp.asarray([[E.head_sender(cfg, li, h) for h in range(H)] for li in range(L)])
  mlps = jnp.asarray([E.mlp_sender(cfg, li) for li in range(L)])
  iv = {"attn.hook_result": _Replace(values[heads], (heads == s)[..., None]),  # [L, H, ...]
        "hook_mlp_out": _Replace(values[mlps], mlps == s)}  # [L, ...]
  final, _ = run_blocks(cfg, params, _Replace(values[0], s == 0)(emb), batch.mask, iv,
                        stacked=stacked)
  return forward(cfg, params, batch.clean, attention_mask=batch.mask,
                 start=LayerStart(cfg.n_layers, final))


def ablated_logits_graph(cfg: ModelConfig, params, batch: Batch, values, s) -> jax.Array:
  """`ablated_logits` in the graph form: row s of the edge weights at 0, every sender's ablated
  value its constant (for configs with post-norms, and as the tests' reference)."""
  B, P = batch.clean.shape
  S, R = E.n_senders(cfg), E.n_receivers(cfg)
  dtype = jax.tree.leaves(params)[0].dtype
  ablated = jnp.broadcast_to(values.astype(dtype)[None, None], (B, P, S, cfg.d_model))
  w = jnp.where((jnp.arange(S) == s)[:, None], 0.0, jnp.ones((S, R), jnp.float32))
  return forward(cfg, params, batch.clean, attention_mask=batch.mask, edges=EdgePatch(w, ablated))


def _sender_sums(cfg: ModelConfig, objective: str, chunk: int | None, params, batch: Batch,
                 values):
  """`sender_losses` before the division by the token count: (per-sender loss sums over the
  batch's real next-token positions, Float[Array, "sender"]; their count, a scalar). Traced
  inside `_split_step`'s jitted gradient."""
  S = E.n_senders(cfg)
  clean_logits = None
  if objective == "kl":
    clean_logits = jax.lax.stop_gradient(
        forward(cfg, params, batch.clean, attention_mask=batch.mask))
  emb = embed_inputs(cfg, params, batch.clean, batch.mask)
  stacked = stack_blocks(cfg, params) if node_form(cfg) and layers_uniform(cfg) else None

  def one(s):
    logits = (ablated_logits(cfg, params, stacked, batch, values, s, emb) if node_form(cfg)
              else ablated_logits_graph(cfg, params, batch, values, s))
    return _token_losses(objective, logits, clean_logits, batch)[0]

  count = jnp.sum(batch.mask[:, 1:] & batch.mask[:, :-1] & batch.valid[:, None], dtype=jnp.float32)
  if chunk is None:  # as many at once as fit, at this batch's (static) shape
    chunk = oa_chunk_size(cfg, *batch.clean.shape)
  if chunk >= S:
    return jax.vmap(one)(jnp.arange(S)), count
  # In chunks, each chunk's forward runs again in the backward pass (`checkpoint`), so the
  # gradient keeps one chunk's activations, not every chunk's: `oa_chunk` bounds the memory. The
  # senders are padded to whole chunks (an index past the last ablates nothing; its loss is
  # dropped), so that one chunk's program serves all of them.
  n = -(-S // chunk) * chunk
  per = jax.lax.map(jax.checkpoint(one), jnp.arange(n), batch_size=chunk)
  return per[:S], count


def _cycle(dataset: Dataset, batch_size: int) -> Iterator[Batch]:
  while True:
    yield from dataset.batches(batch_size, bucket=None)


def ablation_losses(cfg: ModelConfig, params, dataset: Dataset, values, *, objective: str = "lm",
                    batch_size: int = 16, chunk: int | None = None) -> np.ndarray:
  """Mean over the dataset's batches of each sender's ablation loss with its constant in `values`
  (`[n_senders, d_model]`): float64 [n_senders], in nats per token. Mean ablation's loss is this
  with `values = compute_means(...)`."""
  out = [np.asarray(sender_losses(cfg, objective, chunk, params, b, jnp.asarray(values)),
                    np.float64) for b in dataset.batches(batch_size, bucket=None)]
  return np.mean(out, 0)


def learn_optimal_values(cfg: ModelConfig, params, dataset: Dataset, init,
                         options: OptimalOptions = OptimalOptions()) -> tuple[np.ndarray, dict]:
  """Train the constants c_s from `init` (Float [n_senders, d_model], usually the means).

  Returns:
    (values float32 [n_senders, d_model], info) with info = {"steps": steps run, "losses": the mean
    over senders of the ablation loss at each step, "objective": ...}.

  In a multi-process run (`runtime.distributed`) each step's batch is split by rows over the
  processes (`_split_step`): each process differentiates its rows' loss sums, and the gradient sums
  and token counts are added over the processes before the one Adam update every process applies.
  The values equal one process's to float32 rounding (not bitwise: the division by the token
  count comes after the sum). A collective: every process calls it.
  """
  if len(dataset) == 0:
    raise base.AttributionError("the dataset is empty")
  opt = optax.adam(options.oa_lr)
  values = jnp.asarray(init, jnp.float32)
  state = opt.init(values)
  step = (make_step(cfg, options, opt) if distributed.process_count() == 1
          else _split_step(cfg, options, opt))
  losses, best, stale = [], np.inf, 0
  batches = _cycle(dataset, min(options.oa_batch, len(dataset)))
  bar = tqdm(total=options.oa_steps, desc="optimal ablation",
             disable=not options.progress or not distributed.is_writer(), leave=False)
  for i in range(options.oa_steps):
    values, state, loss = step(params, values, state, next(batches))
    losses.append(float(loss))
    base.check_finite(np.asarray(losses[-1:]), i, "the optimal-ablation loss")
    bar.update(1)
    if options.oa_patience and (i + 1) % options.oa_check_every == 0:
      recent = float(np.mean(losses[-options.oa_check_every:]))
      best, stale = (recent, 0) if recent < best else (best, stale + 1)
      if stale >= options.oa_patience:
        break
  bar.close()
  return (np.asarray(values, np.float32),
          {"steps": len(losses), "losses": losses, "objective": options.oa_objective})


def make_step(cfg: ModelConfig, options: OptimalOptions, opt):
  """`learn_optimal_values`' jitted training step, `step(params, values, opt_state, batch) ->
  (values, opt_state, mean ablation loss over the senders)`: one Adam update (`opt`) of the
  constants (Float[Array, "sender d_model"]) on the batch's mean per-token ablation losses.

  The model's weights are an argument, not constants of the program: closed over, they were
  embedded in it, and XLA:CPU took 6.5 s instead of 1.9 s to compile GPT-2 small's step."""

  @jax.jit
  def step(params, values, state, batch):
    def total(v):
      per = sender_losses(cfg, options.oa_objective, options.oa_chunk, params, batch, v)
      return jnp.sum(per), per
    (_, per), g = jax.value_and_grad(total, has_aux=True)(values)
    updates, state = opt.update(g, state, values)
    return optax.apply_updates(values, updates), state, jnp.mean(per)

  return step


def _split_step(cfg: ModelConfig, options: OptimalOptions, opt):
  """`learn_optimal_values`'s step with the batch's rows split over the processes (process p of N
  takes rows [p * k, (p + 1) * k), `distributed.own_rows`; past the end, invalid fillers), returns
  the gradient of its rows' per-sender token-loss sums and their token count, and every process
  divides the sums over all processes (`distributed.allreduce_sum`) by the total count: the
  gradient of the mean per-token loss one process takes, to float32 rounding."""

  @jax.jit
  def partial_grad(params, values, batch):
    def total(v):
      sums, count = _sender_sums(cfg, options.oa_objective, options.oa_chunk, params, batch, v)
      return jnp.sum(sums), (sums, count)
    (_, (sums, count)), grad = jax.value_and_grad(total, has_aux=True)(values)
    return grad, sums, count

  @jax.jit
  def update(values, state, grad):
    updates, state = opt.update(grad, state, values)
    return optax.apply_updates(values, updates), state

  def step(params, values, state, batch):
    part = batch.rows(*distributed.own_rows(batch.clean.shape[0]))
    grad, sums, count = partial_grad(params, values, part)
    got = distributed.allreduce_sum({"grad": np.asarray(grad), "sums": np.asarray(sums),
                                     "count": np.asarray(count)})
    n = max(float(got["count"]), 1.0)
    values, state = update(values, state, jnp.asarray(got["grad"] / n, jnp.float32))
    return values, state, float(np.mean(got["sums"] / n))

  return step


# ----------------------------------------------------------------------------------------- files


def save_values(path: str, values: np.ndarray, meta: dict | None = None) -> None:
  """Save learned constants: the array with orbax (`path/values`) and a JSON record
  (`path/optimal_ablation.json`: format, shape and `meta`, e.g. the model hash and options)."""
  record = {"format": FORMAT, "shape": list(np.shape(values)), "meta": meta or {}}
  files.save_with_record(path, {"values": np.asarray(values, np.float32)}, record,
                         arrays_dir=VALUES_DIR, record_file=META_FILE)


def load_values(path: str, cfg: ModelConfig | None = None) -> tuple[np.ndarray, dict]:
  """Load what `save_values` wrote: (values float32 [n_senders, d_model], meta). With `cfg`, the
  shape is checked against the model's senders."""
  path = os.path.abspath(path)
  tree, record = files.load_with_record(
      path, arrays_dir=VALUES_DIR, record_file=META_FILE, fmt=FORMAT, error=base.AttributionError,
      missing="not a directory of optimal-ablation values (find_circuit writes one to "
              "--out/optimal_ablation)")
  values = np.asarray(tree["values"], np.float32)
  if cfg is not None and values.shape != (E.n_senders(cfg), cfg.d_model):
    raise base.AttributionError(f"{path} holds optimal-ablation values of shape {values.shape}; "
                                f"this model needs {(E.n_senders(cfg), cfg.d_model)}")
  return values, record.get("meta", {})
