"""What the mask-training methods (UGS, edge pruning) share: the circuit's KL to the clean model
under continuous edge weights, the optax training loop, dangling-edge pruning and warm starts.

A mask is a weight `w[s, r]` in [0, 1] per edge: receiver r reads `w * clean_s + (1 - w) *
ablated_s` of each upstream sender s (the graph form's edge weights, `models.EdgePatch`; the steps
run it as the circuit forward's scan over layers, `mask_forward`). `w = 1` everywhere is the
clean model, `w = 0` the fully ablated one. Both methods minimise

    E_x KL( p_clean(. | x) || p_w(. | x) )   at each example's last real token  +  a sparsity term,

(Edge Pruning's and alestolfo/optimalablation's objective, `mask_objective="kl"`) over mask
parameters, or with `mask_objective="task"` the distance of the task metric from the clean model's,
E_x |m_w(x) - m_clean(x)| in the metric's units. The ablated values are the driver's `Ablation` (the
corrupted run for patching).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, mask_forward
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import forward, last_token_logits
from jaxinterp.runtime import distributed
from jaxinterp.tasks import Batch, Dataset, metrics
from jaxinterp.tasks import metrics as task_metrics

OBJECTIVES = ("kl", "task")


@dataclasses.dataclass(frozen=True)
class MaskOptions(base.Options):
  """Options every mask-training method takes.

  Attributes:
    mask_steps: optimiser steps (one batch of `mask_batch` examples each, cycling through the data;
      the references run about 2000 (UGS, one pass over MIB's IOI) and 3000 (Edge Pruning)).
    mask_lr: learning rate; None: the method's reference value.
    mask_batch: examples per step.
    seed: PRNG seed of the mask samples (the same seed and data give the same masks).
    mask_objective: "kl" (KL to the clean model at the last token, the references') or "task"
      (|task metric of the circuit - of the clean model| per example).
    trace_edges: (sender, receiver) pairs whose mask parameter is recorded at every step (in the
      result's extras as `param_{s}_{r}`), to watch the training.
  """

  mask_steps: int = 1000
  mask_lr: float | None = None
  mask_batch: int = 16
  seed: int = 0
  mask_objective: str = "kl"
  trace_edges: tuple = ()

  def __post_init__(self):
    super().__post_init__()
    if self.mask_objective not in OBJECTIVES:
      raise base.AttributionError(f"mask_objective must be one of {OBJECTIVES}, got "
                                  f"{self.mask_objective!r}")
    for name in ("mask_steps", "mask_batch"):
      positive_int(name, getattr(self, name))
    if self.mask_lr is not None:
      positive_float("mask_lr", self.mask_lr)
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise base.AttributionError(f"seed must be an integer, got {self.seed!r}")


def positive_int(name: str, value) -> None:
  """AttributionError naming option `name` unless `value` is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise base.AttributionError(f"{name} must be a positive integer, got {value!r}")


def positive_float(name: str, value) -> None:
  """AttributionError naming option `name` unless `value` is a finite number > 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
      or not np.isfinite(value) or value <= 0:
    raise base.AttributionError(f"{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------- the objective


def clean_and_ablated(cfg: ModelConfig, task, params, batch: Batch, ablation):
  """What every step needs besides the mask, without gradient: the clean model's last-position
  logits [batch, 1, vocab] and the ablated side, which `circuit_loss` reads: the circuit forward's
  per-batch arrays (`mask_forward.prepare`), or, for a config it does not support, the ablated
  sender values [batch, pos, sender, d_model] of the graph-form forward."""
  if CF.supported(cfg):
    prep = mask_forward.prepare(cfg, task, params, batch, ablation)
    return prep.clean_logits, prep
  logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  last = jnp.take_along_axis(logits, batch.last[:, None, None], axis=1)
  ablated = ablation.values(cfg, params, batch)
  return jax.lax.stop_gradient(last), jax.lax.stop_gradient(ablated)


def repeat_rows(n: int, batch: Batch, clean_last, ablated):
  """The batch and `clean_and_ablated`'s two values repeated n times along the rows, for n mask
  samples per example (sample-major: row j * batch + b is example b's j-th sample)."""
  def rep(x):
    return jnp.concatenate([x] * n, 0)

  if isinstance(ablated, CF.Prepared):
    ablated = mask_forward.repeat(ablated, n)
  else:
    ablated = rep(ablated)
  return jax.tree.map(rep, batch), rep(clean_last), ablated


def _last_logits(cfg, params, tokens, mask, last, edges):
  _, cache = forward(cfg, params, tokens, attention_mask=mask, edges=edges,
                     collect=("ln_final.hook_normalized",))
  return last_token_logits(cfg, params, cache["ln_final.hook_normalized"], last)


def circuit_loss(cfg: ModelConfig, task, objective: str, params, batch: Batch, clean_last, ablated,
                 weights):
  """Per-row loss of the circuit `weights`: Float[Array, "batch"]. "kl": KL(clean || circuit) at the
  last real token, in nats; "task": |m(circuit) - m(clean)| in the task metric's units.

  weights: Float[Array, "sender receiver"] (one mask for the batch) or Float[Array, "batch sender
  receiver"] (a mask per row). `clean_last` and `ablated` are `clean_and_ablated`'s: the circuit
  forward's scan over layers (`mask_forward`) runs the circuit, or the graph-form forward (`vmap`
  over rows for per-row masks) where that is unsupported. Only the last position is unembedded.
  """
  if isinstance(ablated, CF.Prepared):
    logits = mask_forward.last_logits(cfg, params, ablated, weights)
  elif weights.ndim == 2:
    logits = _last_logits(cfg, params, batch.clean, batch.mask, batch.last,
                          EdgePatch(weights, ablated))
  else:
    def one(tok, msk, last, abl, w):
      return _last_logits(cfg, params, tok[None], msk[None], last[None], EdgePatch(w, abl[None]))[0]
    logits = jax.vmap(one)(batch.clean, batch.mask, batch.last, ablated, weights)
  zero = jnp.zeros_like(batch.last)
  if objective == "kl":
    return metrics.kl_divergence(logits, clean_last, zero)
  at_last = batch.replace(last=zero)
  return jnp.abs(task.metric(logits, at_last, clean_last) - task.metric(clean_last, at_last,
                                                                        clean_last))


def clean_mean(cfg: ModelConfig, params, dataset: Dataset, batch_size: int = 16) -> float:
  """Mean task metric of the clean model over the dataset (`FitResult.clean_metric`); the batches
  split over the processes of a multi-process run (`distributed.sum_split`: one process's sum)."""
  def one(i, batch):
    del i
    return np.float64(task_metrics.clean_metric(cfg, dataset.task, params, batch)[0])

  return float(distributed.sum_split(dataset.batches(batch_size), one, 0.0)) / len(dataset)


def real_sum(values, batch: Batch):
  """(sum of per-row values over the batch's real rows, the number of real rows)."""
  w = batch.valid.astype(jnp.float32)
  return jnp.sum(values * w), jnp.sum(w)


def sample_rows(samples, n_samples: int, size: int, own):
  """The rows of `own` (Int[Array, "k"], rows of a batch of `size`) in a step's per-row samples
  [n_samples * size, ...] (sample-major: row j * size + b is example b's j-th), sample-major:
  [n_samples * k, ...]."""
  index = (jnp.arange(n_samples)[:, None] * size + own[None, :]).reshape(-1)
  return samples[index]


def traced(param, options: MaskOptions) -> dict:
  """The logged values of `options.trace_edges` in a [S, R] parameter."""
  return {f"param_{s}_{r}": param[s, r] for s, r in options.trace_edges}


def mean_real(values, batch: Batch):
  """Mean of per-row values over the batch's real rows."""
  total, count = real_sum(values, batch)
  return total / jnp.maximum(count, 1.0)


# ------------------------------------------------------------------------------- graph structure


def prune_dangling(cfg: ModelConfig, on):
  """Edges of the discrete masks `on` (Bool[..., sender, receiver]) that lie on a path from the
  input to the logits; the others are dangling. Same shape as `on`.

  Forward reachability from `input` and backward reachability to `logits` over the sender nodes,
  iterated 2 * n_layers + 1 times (the longest path; a loop: the program does not grow with it). An
  edge s -> r is kept if s is reached from the input and r's node reaches the logits.
  """
  g = Graph.from_config(cfg)
  S = g.n_senders
  owner = jnp.asarray(np.eye(S + 1, dtype=np.float32)[g.receiver_node])  # [R, S+1]
  on = on & jnp.asarray(g.valid)
  on_f = on.astype(jnp.float32)
  batch_shape = on.shape[:-2]
  reach_in = jnp.zeros(batch_shape + (S + 1,), bool).at[..., 0].set(True)
  reach_out = jnp.zeros(batch_shape + (S + 1,), bool).at[..., S].set(True)

  def step(_, reach):
    reach_in, reach_out = reach
    hit = jnp.einsum("...s,...sr->...r", reach_in[..., :S].astype(jnp.float32), on_f)
    reach_in = reach_in | (jnp.einsum("...r,rn->...n", hit, owner) > 0)
    ok = jnp.einsum("...n,rn->...r", reach_out.astype(jnp.float32), owner)
    out_s = jnp.einsum("...sr,...r->...s", on_f, ok) > 0
    return reach_in, reach_out.at[..., :S].set(reach_out[..., :S] | out_s)

  reach_in, reach_out = jax.lax.fori_loop(0, 2 * cfg.n_layers + 1, step, (reach_in, reach_out))
  dest_ok = jnp.einsum("...n,rn->...r", reach_out.astype(jnp.float32), owner) > 0
  return on & reach_in[..., :S, None] & dest_ok[..., None, :]


def warm_start_ranks(cfg: ModelConfig, path: str) -> np.ndarray:
  """Rank-normalised |score| of every valid edge in an EAP-IG graph.json (1 = the top edge, 0 = the
  last; 0 on invalid edges): float32 [n_senders, n_receivers]."""
  try:
    g = Graph.from_json(path, cfg)
  except (ValueError, OSError) as e:
    raise base.AttributionError(f"init_from={path!r}: {e}") from None
  valid = valid_edges(cfg)
  s = np.abs(np.asarray(g.scores, np.float64))[valid]
  ranks = np.empty(s.size)
  ranks[np.argsort(s, kind="stable")] = np.arange(s.size) / max(s.size - 1, 1)
  out = np.zeros(valid.shape, np.float32)
  out[valid] = ranks
  return out


# ----------------------------------------------------------------------------------------- loop


def cycle(dataset: Dataset, batch_size: int) -> Iterator[Batch]:
  """Batches of the dataset, in order, again and again (one fixed shape: no bucketing)."""
  batch_size = min(batch_size, len(dataset))
  while True:
    yield from dataset.batches(batch_size, bucket=None)


@dataclasses.dataclass(frozen=True)
class SplitStep:
  """A mask method's step in two halves, for a multi-process run, where each process takes its
  rows of every step's batch (`distributed.own_rows`).

  Attributes:
    rows: `(state, part, key, own, size) -> (grad, sums)`: the gradient (a pytree like the trained
      parameters) of the summed per-row loss of `part`, this process's rows `own` (Int[Array, "k"])
      of the step's batch of `size` rows, with the per-row mask samples the whole batch draws from
      `key` (`sample_rows`); `sums`: a dict of float sums over the part's real rows, "count" (their
      number) among them.
    update: `(state, grad, means, key, i, size) -> (state, logs)`: the optimiser step with the
      rows' gradient and sums added over the processes and divided by the total count, plus the
      batch-independent terms (penalties), as the one-process step takes it.
  """

  rows: Callable
  update: Callable

  def __call__(self, state, batch: Batch, key, i):
    size = batch.clean.shape[0]
    own, real = distributed.own_rows(size)
    grad, sums = self.rows(state, batch.rows(own, real), key, jnp.asarray(own), size)
    leaves, tree = jax.tree.flatten(grad)
    got = distributed.allreduce_sum({**{f"grad{j}": np.asarray(g) for j, g in enumerate(leaves)},
                                     **{k: np.asarray(v) for k, v in sums.items()}})
    n = max(float(got.pop("count")), 1.0)
    grad = jax.tree.unflatten(tree, [jnp.asarray(got.pop(f"grad{j}") / n, jnp.float32)
                                     for j in range(len(leaves))])
    return self.update(state, grad, {k: jnp.asarray(v / n, jnp.float32) for k, v in got.items()},
                       key, i, size)


def train(step: Callable, split: SplitStep, state, dataset: Dataset, options: MaskOptions,
          desc: str):
  """Run `state, logs = step(state, batch, key, i)` for `options.mask_steps` steps; in a
  multi-process run `split` takes each step instead, the batch's rows split over the processes and
  the gradient sums added (float64, in process order) before the one update every process applies:
  the masks one process trains, to float32 rounding (a collective: every process calls it).

  Returns the final state and a dict of per-step histories (float64 arrays) of the logged scalars,
  which are checked to be finite.
  """
  if len(dataset) == 0:
    raise base.AttributionError("the dataset is empty")
  if distributed.process_count() > 1:
    step = split
  key = jax.random.PRNGKey(options.seed)
  batches = cycle(dataset, options.mask_batch)
  history: dict[str, list] = {}
  bar = tqdm(total=options.mask_steps, desc=desc, leave=False,
             disable=not options.progress or not distributed.is_writer())
  for i in range(options.mask_steps):
    key, sub = jax.random.split(key)
    state, logs = step(state, next(batches), sub, jnp.asarray(i, jnp.int32))
    for k, v in logs.items():
      history.setdefault(k, []).append(float(v))
    base.check_finite(np.asarray([history[k][-1] for k in logs]), i, f"{desc}'s loss")
    bar.update(1)
  bar.close()
  return state, {k: np.asarray(v, np.float64) for k, v in history.items()}
