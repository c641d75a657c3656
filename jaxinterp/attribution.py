"""Edge attribution: EAP, EAP-IG (inputs / activations), clean-corrupted and exact patching.

Every method is a pure JAX transform of the graph-form forward (`models.EdgePatch`): receivers read
`x_r = resid_r - sum_s (1 - w[s,r]) (live_s - ablated_s)`, so at `w = 1`

    dm/dw[s, r] = sum_pos (live_s - ablated_s) . dm/dx_r

and the EAP score `(a_s^ablated - a_s^clean) . dm/dx_r` is `-dm/dw`. The contraction with the sender
differences happens layer by layer inside the backward pass, so memory stays O(senders x receivers)
plus one layer of per-head inputs; no per-receiver copy of the residual stream is kept.

Scores are in the metric's own units: `score(s->r) ~ mean over examples of m(edge ablated) - m(clean)`.
For EAP-IG the gradients are averaged over alpha_k = k/m, k = 0..m-1 (the `eap` package's convention;
`ig_convention="paper"` gives k = 1..m), with the input embeddings interpolated from corrupted to clean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.graph import Graph
from jaxinterp.tasks import Batch, Dataset, Task
from models import edges as E
from models.config import ModelConfig
from models.edges import EdgePatch
from models.transformer import (LayerStart, Norm, embed_inputs, forward, last_token_logits,
                                ungroup_kv)

Array = jax.Array

METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")
INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


class AttributionError(ValueError):
  """Bad attribution arguments, or a metric that became NaN/inf (the batch is named)."""


# ------------------------------------------------------------------------------------------ helpers


def sender_outputs(cfg: ModelConfig, params, tokens: Array, mask: Optional[Array] = None,
                   **kw) -> Array:
  """Every sender's output (input node, heads, MLPs): Float[Array, "batch pos sender d_model"]."""
  _, cache = forward(cfg, params, tokens, attention_mask=mask, edges=EdgePatch(None, None),
                     collect=("hook_senders",), **kw)
  return cache["hook_senders"]


def metric_sum(task: Task, logits: Array, batch: Batch, clean_logits: Optional[Array]) -> Array:
  """Sum of the per-example metric over the batch's real (valid) rows, and the per-example values."""
  values = task.metric(logits, batch, clean_logits)
  return jnp.sum(jnp.where(batch.valid, values, 0.0)), values


def metric_at_last(cfg: ModelConfig, task: Task, params, batch: Batch, x: Array,
                   clean_logits: Optional[Array]):
  """`metric_sum` from the final-norm output x, unembedding only each example's last real position
  (`clean_logits`, if the task reads them, are last-position logits too: [batch, 1, vocab])."""
  logits = last_token_logits(cfg, params, x, batch.last)
  return metric_sum(task, logits, batch.replace(last=jnp.zeros_like(batch.last)), clean_logits)


@flax.struct.dataclass
class Shift:
  """x -> x + delta: the additive side input the fused-head kernels put at a site (delta may be
  zero when only its gradient is wanted)."""

  delta: Array

  def __call__(self, x):
    return x + self.delta.astype(x.dtype)


def ig_alphas(steps: int, convention: str = "eap", method: str = "EAP-IG-inputs") -> np.ndarray:
  """Interpolation points alpha_k for integrated gradients.

  "eap" follows the `eap` package: k/m for k = 0..m-1 for inputs, k = 1..m for activations.
  "paper" uses k = 1..m (ending at the clean input) for both.
  """
  if not isinstance(steps, int) or steps < 1:
    raise AttributionError(f"ig_steps must be a positive integer, got {steps!r}")
  if convention not in ("eap", "paper"):
    raise AttributionError(f"ig_convention must be 'eap' or 'paper', got {convention!r}")
  k = np.arange(steps) + (0 if convention == "eap" and method == "EAP-IG-inputs" else 1)
  return (k / steps).astype(np.float32)


@flax.struct.dataclass
class Ablation:
  """Counterfactual sender values: `kind` in INTERVENTIONS, and `means` for the mean ablations.

  means: Float[Array, "sender d_model"] (mean) or Float[Array, "pos sender d_model"]
  (mean-positional), averaged over real tokens of a reference dataset.
  """

  kind: str = flax.struct.field(pytree_node=False, default="patching")
  means: Optional[Array] = None

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    """The ablated sender outputs for a batch: Float[Array, "batch pos sender d_model"]."""
    B, P = batch.clean.shape
    if self.kind == "patching":
      return sender_outputs(cfg, params, batch.corrupted, batch.mask)
    dtype = jax.tree.leaves(params)[0].dtype
    shape = (B, P, E.n_senders(cfg), cfg.d_model)
    if self.kind == "zero":
      return jnp.zeros(shape, dtype)
    if self.kind == "mean":
      return jnp.broadcast_to(self.means.astype(dtype), shape)
    means = self.means[:P]
    if means.shape[0] < P:
      means = jnp.concatenate([means, jnp.zeros((P - means.shape[0],) + means.shape[1:], means.dtype)])
    return jnp.broadcast_to(means.astype(dtype), shape)


def compute_means(cfg: ModelConfig, params, dataset: Dataset, batch_size: int,
                  positional: bool = False) -> Array:
  """Mean sender outputs over the real tokens of `dataset`'s clean prompts.

  Returns Float[Array, "sender d_model"], or Float[Array, "pos sender d_model"] if `positional`.
  """
  fn = jax.jit(lambda p, t, m: sender_outputs(cfg, p, t, m))
  total, count = None, None
  for batch in dataset.batches(batch_size, bucket=None):
    acts = fn(params, batch.clean, batch.mask).astype(jnp.float32)
    w = (batch.mask & batch.valid[:, None]).astype(jnp.float32)  # [B, P]
    if positional:
      s, c = jnp.einsum("bpsd,bp->psd", acts, w), w.sum(0)
    else:
      s, c = jnp.einsum("bpsd,bp->sd", acts, w), w.sum()
    total = s if total is None else total + s
    count = c if count is None else count + c
  if positional:
    return total / jnp.maximum(count, 1.0)[:, None, None]
  return total / jnp.maximum(count, 1.0)


def make_ablation(cfg: ModelConfig, params, dataset: Dataset, intervention: str, batch_size: int,
                  mean_dataset: Optional[Dataset] = None) -> Ablation:
  """Build the `Ablation` for an intervention name (means from `mean_dataset`, default `dataset`)."""
  if intervention not in INTERVENTIONS:
    raise AttributionError(f"unknown intervention {intervention!r}; choose from {INTERVENTIONS}")
  if intervention.startswith("mean"):
    means = compute_means(cfg, params, mean_dataset or dataset, batch_size,
                          positional=intervention == "mean-positional")
    return Ablation(intervention, means)
  return Ablation(intervention)


def _ones(cfg: ModelConfig, dtype=jnp.float32) -> Array:
  return jnp.ones((E.n_senders(cfg), E.n_receivers(cfg)), dtype)


def _check_finite(values: np.ndarray, batch_index: int, what: str) -> None:
  if not np.all(np.isfinite(values)):
    bad = np.flatnonzero(~np.isfinite(values)).tolist()
    raise AttributionError(f"{what} is NaN/inf in batch {batch_index} (rows {bad[:10]}); check the "
                           f"labels and the model for these examples")


# ----------------------------------------------------------------------------- per-batch kernels


@functools.partial(jax.jit, static_argnames=("cfg", "task", "remat"))
def _ig_inputs_batch(cfg, task, params, batch, ablation, alphas, remat=False):
  """Reference EAP-IG-inputs kernel: gradients of the edge weights `w` at w = 1.

  `attribute` uses the equivalent, faster `receiver_grads.ig_inputs_batch`; this direct form of the
  definition is kept as the cross-check the tests compare it with.
  """
  ablated = ablation.values(cfg, params, batch)
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  e_clean = clean[:, :, 0]
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)

  def f(w, alpha):
    emb = e_corrupt + alpha.astype(e_clean.dtype) * (e_clean - e_corrupt)
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                     edges=EdgePatch(w, ablated, live=clean), remat=remat)
    return metric_sum(task, logits, batch, clean_logits)

  def step(total, alpha):
    g, values = jax.grad(f, has_aux=True)(_ones(cfg), alpha)
    return total + g, values

  total, values = jax.lax.scan(step, jnp.zeros_like(_ones(cfg)), alphas)
  return -total / alphas.shape[0], values[-1]


def _layer_groups(cfg: ModelConfig) -> list[tuple[str, Optional[str]]]:
  """The 'layer nodes' EAP-IG-activations interpolates one at a time: input, each attn, each MLP."""
  groups = [("input", None)]
  for l in range(cfg.n_layers):
    groups += [("attn", f"blocks.{l}.attn.hook_result"), ("mlp", f"blocks.{l}.hook_mlp_out")]
  return groups


@flax.struct.dataclass
class _Blend:
  """x + s * (alpha * clean + (1 - alpha) * corrupted - x): interpolate one site when s = 1."""

  clean: Array
  corrupted: Array
  s: Array
  alpha: Array

  def __call__(self, x):
    target = self.alpha * self.clean + (1 - self.alpha) * self.corrupted
    return x + self.s * (target.astype(x.dtype) - x)


@functools.partial(jax.jit, static_argnames=("cfg", "task", "remat"))
def _ig_activations_batch(cfg, task, params, batch, ablation, alphas, remat=False):
  ablated = ablation.values(cfg, params, batch)
  groups = _layer_groups(cfg)
  names = tuple(n for _, n in groups if n)
  clean_logits, clean_cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                                      collect=names)
  _, corrupt_cache = forward(cfg, params, batch.corrupted, attention_mask=batch.mask, collect=names)
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  e_clean = clean[:, :, 0]
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)
  G = len(groups)

  def f(w, g, alpha):
    s = jax.nn.one_hot(g, G, dtype=e_clean.dtype)
    emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
    iv = {n: _Blend(clean_cache[n], corrupt_cache[n], s[i + 1], alpha) for i, n in enumerate(names)}
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                     interventions=iv, edges=EdgePatch(w, ablated, live=clean), remat=remat)
    return metric_sum(task, logits, batch, clean_logits)

  gs = jnp.repeat(jnp.arange(G), alphas.shape[0])
  als = jnp.tile(alphas, G)

  def step(total, ga):
    g, values = jax.grad(f, has_aux=True)(_ones(cfg), ga[0].astype(jnp.int32), ga[1])
    return total + g, values

  total, values = jax.lax.scan(step, jnp.zeros_like(_ones(cfg)),
                               jnp.stack([gs.astype(alphas.dtype), als], 1))
  return -total / (G * alphas.shape[0]), values[-1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _upstream_cache(cfg, params, batch, ablation):
  """The clean run's inputs of every layer's receivers, and the sender (clean - ablated) deltas.

  Returns (resids Float[Array, "layer+1 batch pos d_model"]: the residual stream entering each block
  and the final norm; mlp_inputs Float[Array, "layer batch pos d_model"]: each MLP's input before
  its norm; delta Float[Array, "batch pos sender d_model"]). With one edge into layer l ablated,
  everything before that receiver is the clean run.
  """
  L = cfg.n_layers
  mid = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
  names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
  mlp_names = [f"blocks.{l}.{mid}" for l in range(L)]
  ablated = ablation.values(cfg, params, batch)
  _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask, edges=EdgePatch(None, None),
                     collect=tuple(dict.fromkeys(names + mlp_names)) + ("hook_senders",))
  resids = jnp.stack([cache[n] for n in names])
  mlp_inputs = jnp.stack([cache[n] for n in mlp_names])
  return resids, mlp_inputs, cache["hook_senders"] - ablated


@functools.partial(jax.jit, static_argnames=("cfg", "task", "layer"))
def _exact_chunk(cfg, task, layer, params, batch, resid, mlp_input, delta_prefix, senders,
                 receivers, clean_logits):
  """Metric sums with one edge (senders[i] -> receivers[i], all into `layer`) ablated at a time.

  Each copy (`vmap` over the edges) is the plain fused-head forward from `layer` on, started from
  the clean run's residual stream, with the one receiver's input x_r moved to x_r - delta_s:
  a head's q/k/v input changes that head's q/k/v by `(norm(x - delta) - norm(x)) W[h]` (added at
  `attn.hook_q/k/v`), an MLP input changes its normalised input by `norm(x - delta) - norm(x)`
  (at `ln2.hook_normalized`), and the logits input is the final residual minus delta. Nothing
  else is recomputed before `layer`, no per-head inputs are formed, and the metric reads only the
  last position's logits. `clean_logits` are last-position logits [batch, 1, vocab] (or None).
  Returns Float[Array, "chunk"].
  """
  cfg, params = ungroup_kv(cfg, params)  # a query head's k/v input is its own
  L, H = cfg.n_layers, cfg.n_heads
  norm = lambda p, x: Norm(cfg).apply({"params": p}, x)

  if layer == L:  # the logits receiver: only the final norm runs
    def one(s, r):
      x = norm(params["ln_final"], resid - delta_prefix[:, :, s])
      return metric_at_last(cfg, task, params, batch, x, clean_logits)[0]
    return jax.vmap(one)(senders, receivers)

  blk = params[f"blocks_{layer}"]
  W = jnp.concatenate([blk["attn"][f"W_{c}"] for c in "QKV"])  # [3H, d, d_head]
  y_attn, y_mlp = norm(blk["ln1"], resid), norm(blk["ln2"], mlp_input)
  start = LayerStart(layer, resid)
  p = f"blocks.{layer}."

  def one(s, r):
    local = r - E.head_receiver(cfg, layer, 0, "q")  # 0..3H-1: q/k/v of a head; 3H: the MLP
    delta = delta_prefix[:, :, s]
    is_head = local < 3 * H
    d_attn = (norm(blk["ln1"], resid - delta) - y_attn) @ W[jnp.minimum(local, 3 * H - 1)]
    d_qkv = jnp.where((jnp.arange(3 * H) == local)[None, None, :, None], d_attn[:, :, None], 0.0)
    d_mlp = jnp.where(is_head, 0.0, norm(blk["ln2"], mlp_input - delta) - y_mlp)
    iv = {p + f"attn.hook_{c}": Shift(d_qkv[:, :, i * H:(i + 1) * H]) for i, c in enumerate("qkv")}
    iv[p + "ln2.hook_normalized"] = Shift(d_mlp)
    _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask, interventions=iv,
                       start=start, collect=("ln_final.hook_normalized",))
    return metric_at_last(cfg, task, params, batch, cache["ln_final.hook_normalized"],
                          clean_logits)[0]

  return jax.vmap(one)(senders, receivers)


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _clean_metric(cfg, task, params, batch):
  logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  total, values = metric_sum(task, logits, batch, logits)
  return total, values, logits


# ------------------------------------------------------------------------------------- public API


@dataclasses.dataclass
class Attribution:
  """Edge scores and how they were computed.

  Attributes:
    scores: float32 [n_senders, n_receivers], in the metric's units (0 on invalid edges).
    method, intervention, ig_steps, n_examples: provenance.
    clean_metric: mean metric of the clean model over the examples.
  """

  scores: np.ndarray
  method: str
  intervention: str
  ig_steps: int
  n_examples: int
  clean_metric: float


def valid_edges(cfg: ModelConfig) -> np.ndarray:
  """Bool [n_senders, n_receivers]: which sender->receiver pairs are real edges."""
  return Graph.from_config(cfg).valid


@dataclasses.dataclass
class Progress:
  """Running state of an attribution, for checkpointing and resuming long runs.

  Attributes:
    next_batch: index of the next batch to process.
    score_sum: float64 [n_senders, n_receivers], the sum over processed examples of the scores.
    clean_sum: sum over processed examples of the clean metric.
    seen: examples processed so far.
  """

  next_batch: int = 0
  score_sum: Optional[np.ndarray] = None
  clean_sum: float = 0.0
  seen: int = 0


def attribute(cfg: ModelConfig, params, dataset: Dataset, *, method: str = "EAP-IG-inputs",
              intervention: str = "patching", ig_steps: int = 5, batch_size: int = 16,
              ig_convention: str = "eap", mean_dataset: Optional[Dataset] = None,
              exact_chunk: Optional[int] = None, remat: bool = False, quiet: bool = False,
              resume: Optional[Progress] = None,
              on_batch: Optional[Callable[[Progress], None]] = None,
              batch_fn: Optional[Callable[[Batch], Batch]] = None) -> Attribution:
  """Score every edge of the model's graph on `dataset` (its task's metric).

  Args:
    cfg, params: the model.
    dataset: prompt pairs; the metric is `dataset.task`'s, read at each example's last real token.
    method: one of METHODS.
    intervention: how ablated senders are valued: "patching" (the corrupted run), "zero", "mean" or
      "mean-positional" (means over `mean_dataset`, default `dataset`). EAP-IG-inputs interpolates
      the inputs from corrupted to clean, so it takes only "patching".
    ig_steps: m, the number of integrated-gradient steps.
    batch_size: examples per compiled call (the last batch is padded; padding rows do not count).
    ig_convention: "eap" (k = 0..m-1 for inputs) or "paper" (k = 1..m).
    exact_chunk: edges evaluated per compiled call by `vmap` in the exact method (default: as many
      as fit in about 2 GB of activations, see `exact_chunk_size`).
    remat: rematerialise blocks in the backward pass (less memory).
    resume: a `Progress` from a checkpoint; batches before `resume.next_batch` are skipped and the
      sums continue from it (the result is bitwise what an uninterrupted run gives).
    on_batch: called with the `Progress` after every batch (e.g. to checkpoint it).
    batch_fn: applied to every batch first, e.g. `functools.partial(sharding.shard_batch,
      mesh=mesh)` for data parallelism over a device mesh (with `sharding.shard_params`).

  Returns:
    An `Attribution` with scores `[n_senders, n_receivers]` in the metric's units.
  """
  if method not in METHODS:
    raise AttributionError(f"unknown method {method!r}; choose from {METHODS}")
  if method == "EAP-IG-inputs" and intervention != "patching":
    raise AttributionError("EAP-IG-inputs interpolates from the corrupted inputs; it supports only "
                           "intervention='patching'")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise AttributionError(f"batch_size must be a positive integer, got {batch_size!r}")
  if len(dataset) == 0:
    raise AttributionError("the dataset is empty")
  alphas = None
  if method in ("EAP-IG-inputs", "EAP-IG-activations"):
    alphas = jnp.asarray(ig_alphas(ig_steps, ig_convention, method))
  elif method == "clean-corrupted":
    alphas = jnp.asarray([0.0, 1.0], jnp.float32)
  else:  # EAP: the gradient at the clean input
    alphas = jnp.asarray([1.0], jnp.float32)
  ablation = make_ablation(cfg, params, dataset, intervention, batch_size, mean_dataset)
  task = dataset.task
  valid = valid_edges(cfg)
  state = dataclasses.replace(resume) if resume is not None else Progress()
  if state.score_sum is None:
    state.score_sum = np.zeros(valid.shape, np.float64)
  if state.score_sum.shape != valid.shape:
    raise AttributionError(f"resumed scores have shape {state.score_sum.shape}, expected "
                           f"{valid.shape}")
  n_batches = math.ceil(len(dataset) / batch_size)
  bar = tqdm(total=n_batches, desc=f"{method} ({intervention})", disable=quiet, unit="batch",
             initial=state.next_batch)
  from jaxinterp import receiver_grads  # the receiver-gradient kernel builds on this module
  for i, batch in enumerate(dataset.batches(batch_size)):
    if i < state.next_batch:
      continue
    if batch_fn is not None:
      batch = batch_fn(batch)
    n_real = int(np.sum(np.asarray(batch.valid)))
    if method in ("EAP", "EAP-IG-inputs", "clean-corrupted"):  # the kernel runs the clean model too
      s, values, c_values = receiver_grads.ig_inputs_batch(cfg, task, params, batch, ablation,
                                                           alphas, remat=remat)
      c_total = jnp.sum(jnp.where(batch.valid, c_values, 0.0))
    else:
      c_total, c_values, clean_logits = _clean_metric(cfg, task, params, batch)
      if method == "EAP-IG-activations":
        s, values = _ig_activations_batch(cfg, task, params, batch, ablation, alphas, remat=remat)
      else:
        s = _exact_batch(cfg, task, ablation, params, batch, valid, float(c_total), clean_logits,
                         exact_chunk, quiet or n_batches > 1)
        values = c_values
    _check_finite(np.asarray(c_values)[np.asarray(batch.valid)], i, "the clean metric")
    s = np.asarray(s, np.float64)
    _check_finite(np.asarray(values)[np.asarray(batch.valid)], i, "the metric")
    _check_finite(s[valid], i, "an edge score")
    state.score_sum = state.score_sum + s
    state.clean_sum += float(c_total)
    state.seen += n_real
    state.next_batch = i + 1
    bar.update(1)
    if on_batch is not None:
      on_batch(state)
  bar.close()
  scores = np.where(valid, state.score_sum / len(dataset), 0.0).astype(np.float32)
  return Attribution(scores, method, intervention, ig_steps, len(dataset),
                     state.clean_sum / max(state.seen, 1))


def exact_chunk_size(cfg: ModelConfig, batch_size: int, n_pos: int,
                     budget_bytes: Optional[float] = None) -> int:
  """Edges per vmapped exact-patching call so that the copies' activations fit in `budget_bytes`.

  Each copy holds about one plain forward's activations of the blocks it reruns (residual stream,
  norms, q/k/v, attention pattern, MLP activations) and the last position's logits, in float32. The
  default budget is a quarter of the accelerator's memory, or 4 GB where the device does not report
  it (CPU).
  """
  if budget_bytes is None:
    stats = jax.devices()[0].memory_stats() or {}
    budget_bytes = stats.get("bytes_limit", 16e9) / 4
  per_layer = 10 * cfg.d_model + 3 * cfg.d_mlp + 2 * cfg.n_heads * n_pos
  per_copy = 4.0 * batch_size * (n_pos * per_layer * cfg.n_layers + cfg.d_vocab)
  return int(max(1, min(256, budget_bytes // per_copy)))


def _exact_batch(cfg, task, ablation, params, batch, valid, clean_total, clean_logits, chunk, quiet):
  """Sum over the batch of m(edge ablated) - m(clean), for every valid edge: [n_senders, n_receivers].

  Edges are grouped by their receiver's layer; each group reruns only the blocks from that layer on,
  from the clean run's cached upstream activations, `chunk` edges per vmapped call.
  """
  resids, mlp_inputs, delta = _upstream_cache(cfg, params, batch, ablation)
  if clean_logits is not None:  # the kernel reads last-position logits only
    clean_logits = jnp.take_along_axis(clean_logits, batch.last[:, None, None], axis=1)
  if chunk is None:
    chunk = exact_chunk_size(cfg, *batch.clean.shape)
  s_idx, r_idx = np.nonzero(valid)
  layer_of = np.minimum(r_idx // (3 * cfg.n_heads + 1), cfg.n_layers)
  out = np.zeros(valid.shape, np.float64)
  work = [(l, np.flatnonzero(layer_of == l)) for l in range(cfg.n_layers + 1)]
  bar = tqdm(total=sum(-(-len(e) // chunk) for _, e in work), desc="exact: edge chunks",
             disable=quiet, leave=False)
  for l, edges in work:
    if not len(edges):
      continue
    n_up = E.n_upstream_of_mlp(cfg, l) if l < cfg.n_layers else E.n_senders(cfg)
    pad = (-len(edges)) % chunk
    idx = np.concatenate([edges, np.repeat(edges[-1:], pad)])
    for start in range(0, idx.size, chunk):
      sel = idx[start:start + chunk]
      vals = np.asarray(_exact_chunk(cfg, task, l, params, batch, resids[l],
                                     mlp_inputs[min(l, cfg.n_layers - 1)], delta[:, :, :n_up],
                                     jnp.asarray(s_idx[sel], jnp.int32),
                                     jnp.asarray(r_idx[sel], jnp.int32), clean_logits), np.float64)
      keep = sel[:max(0, min(chunk, len(edges) - start))]
      out[s_idx[keep], r_idx[keep]] = vals[:len(keep)] - clean_total
      bar.update(1)
  bar.close()
  return out


def node_scores(cfg: ModelConfig, scores: np.ndarray) -> np.ndarray:
  """First-order node scores: the effect of ablating a sender's output into all its receivers.

  For gradient methods this is exactly the row sum of the (signed) edge scores, since a sender's
  output enters each downstream receiver additively. Returns float32 [n_senders].
  """
  return np.where(valid_edges(cfg), scores, 0.0).sum(1).astype(np.float32)
