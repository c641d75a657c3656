"""ACDC, automatic circuit discovery (Conmy et al. 2023; ArthurConmy/Automatic-Circuit-Discovery):
greedy edge removal in reverse topological order with a threshold tau.

Starting from the full graph, the receivers are visited from the logits backwards (descending
receiver index: the logits, then each layer's MLP, then its heads' v, k and q inputs, layer by layer
down to 0). For each receiver r, its incoming edges s -> r are tried one at a time, the latest
sender first: with the current circuit C,

    Delta = L(C minus s -> r) - L(C),   remove the edge (C <- C minus s -> r)  if  Delta < tau,

where L is the mean over the examples of KL(clean || circuit) at the last real token, in nats
(`acdc_metric="kl"`, ACDC's default), or the distance of the mean task metric from the full model's,
|m(C) - m(full)| in the metric's units (`acdc_metric="task"`). A receiver whose node no longer feeds
any edge of the circuit loses all its incoming edges without a trial (ACDC's
`current_node_connected`); the circuit's metric cannot change by that.

Built on the exact-patching machinery (`exact.upstream_cache`): while the receivers of layer l are
visited, every edge into an earlier layer is still present, so everything upstream of layer l is the
clean run. Each trial reruns the graph-form forward from layer l only, started from the cached clean
residual stream and sender differences (`LayerStart`), and unembeds only the last position. The
trials into one receiver run in one vectorised call (`vmap` over `acdc_chunk` masks) as a chain:
mask j removes the receiver's first j+1 candidate edges (each after the previous removals), which is
exactly the sequential greedy as long as the edges are removed; at the first kept edge the rest of
the chain is stale and is re-evaluated from the new circuit. Most edges are removed, so a receiver
costs about one call per kept edge plus one.

Scores: Delta of each edge when it was tried (in L's units; positive = removing it moved the circuit
away from the full model; the kept edges are those with Delta >= tau), 0 for edges never tried.
`extras["circuit"]` is ACDC's circuit (Bool [n_senders, n_receivers]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, exact, masks
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import LayerStart, forward, last_token_logits
from jaxinterp.runtime import compile_policy, distributed
from jaxinterp.tasks import metrics

METRICS = ("kl", "task")


@dataclasses.dataclass(frozen=True)
class ACDCOptions(base.Options):
  """Options of ACDC.

  Attributes:
    tau: the threshold: an edge is removed if removing it raises L by less than tau (> 0).
    acdc_metric: "kl" (KL(clean || circuit), nats) or "task" (|m(circuit) - m(full)|).
    acdc_batch: examples per evaluation call (None: up to 64).
    acdc_chunk: candidate masks per vectorised call (at most the largest in-degree is used).
  """

  tau: float = 0.01
  acdc_metric: str = "kl"
  acdc_batch: int | None = None
  acdc_chunk: int = 32

  def __post_init__(self):
    super().__post_init__()
    masks.positive_float("tau", self.tau)
    if self.acdc_metric not in METRICS:
      raise base.AttributionError(f"acdc_metric must be one of {METRICS}, got "
                                  f"{self.acdc_metric!r}")
    if self.acdc_batch is not None:
      masks.positive_int("acdc_batch", self.acdc_batch)
    masks.positive_int("acdc_chunk", self.acdc_chunk)


@functools.partial(compile_policy.jit, static_argnames=("cfg",))
def _prepare(cfg, params, batch, ablation):
  """Per batch: the clean residual stream entering each layer, (clean - ablated) senders, the
  ablated senders and the clean last-position logits."""
  resids, _, delta, _ = exact.upstream_cache(cfg, params, batch, ablation)
  ablated = ablation.values(cfg, params, batch)
  logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  clean_last = jnp.take_along_axis(logits, batch.last[:, None, None], axis=1)
  return resids, delta, ablated, clean_last


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "layer", "metric"))
def circuit_sums(cfg, task, layer, metric, params, batch, resid, delta, ablated, clean_last,
                 weights):
  """Sum over the batch's real rows of the metric ("kl": KL to clean; "task": the task metric) for
  each circuit in weights [C, S, R] whose edges into layers < `layer` are all present: the forward
  reruns from `layer` only. Returns Float[Array, "C"]."""
  n_up = E.n_upstream_of_attn(cfg, layer) if layer < cfg.n_layers else E.n_senders(cfg)
  start = LayerStart(layer, resid, delta[:, :, :n_up])
  zero = jnp.zeros_like(batch.last)
  at_last = batch.replace(last=zero)

  def one(w):
    _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                       edges=EdgePatch(w, ablated), start=start,
                       collect=("ln_final.hook_normalized",))
    logits = last_token_logits(cfg, params, cache["ln_final.hook_normalized"], batch.last)
    if metric == "kl":
      values = metrics.kl_divergence(logits, clean_last, zero)
    else:
      values = task.metric(logits, at_last, clean_last)
    return jnp.sum(jnp.where(batch.valid, values, 0.0))

  return jax.vmap(one)(weights)


class _Evaluator:
  """L(circuit) for stacks of circuits, over the whole dataset, from cached clean runs.

  Several processes (`runtime.distributed`): process p prepares and runs batches p, p + N, ...
  only, and each trial's sums are added in batch order on every process
  (`distributed.sum_split`), so every process takes the same decisions, and they are one
  process's, bitwise."""

  def __init__(self, cfg, params, dataset, ablation, options: ACDCOptions):
    self.cfg, self.params, self.task, self.options = cfg, params, dataset.task, options
    bs = min(options.acdc_batch or 64, len(dataset))
    n, me = distributed.process_count(), distributed.process_index()
    self.batches = [(b, _prepare(cfg, params, b, ablation) if i % n == me else None)
                    for i, b in enumerate(dataset.batches(bs, bucket=None))]
    self.n = len(dataset)
    self.calls = 0
    self.m_full = None
    if options.acdc_metric == "task":
      full = np.ones(valid_edges(cfg).shape, np.float32)
      self.m_full = float(self._means(self.cfg.n_layers, full[None])[0])

  def _means(self, layer, weights):
    w = jnp.asarray(weights)

    def one(_, item):
      batch, (resids, delta, ablated, clean_last) = item
      return np.asarray(circuit_sums(self.cfg, self.task, layer, self.options.acdc_metric,
                                     self.params, batch, resids[layer], delta, ablated,
                                     clean_last, w), np.float64)

    total = distributed.sum_split(self.batches, one, np.zeros(len(weights), np.float64))
    self.calls += 1
    return total / self.n

  def loss(self, layer: int, weights: np.ndarray) -> np.ndarray:
    """L of each circuit in weights [C, S, R] (edges into layers < `layer` must all be present)."""
    means = self._means(layer, weights)
    return means if self.m_full is None else np.abs(means - self.m_full)


def fit(cfg: ModelConfig, params, dataset, ablation, options: ACDCOptions) -> base.FitResult:
  """Run ACDC on `dataset`; scores are the Delta measured when each edge was tried."""
  if len(dataset) == 0:
    raise base.AttributionError("the dataset is empty")
  valid = valid_edges(cfg)
  S, R = valid.shape
  owner = Graph.from_config(cfg).receiver_node
  ev = _Evaluator(cfg, params, dataset, ablation, options)
  w = np.ones((S, R), np.float32)
  scores = np.zeros((S, R), np.float64)
  chunk = int(min(options.acdc_chunk, valid.sum(0).max()))
  layer_of = np.minimum(np.arange(R) // (3 * cfg.n_heads + 1), cfg.n_layers)
  cur = float(ev.loss(cfg.n_layers, w[None])[0])
  for r in tqdm(range(R - 1, -1, -1), desc="ACDC receivers", disable=not options.progress,
                leave=False):
    node = owner[r]
    if node < S and not np.any(w[node] * valid[node]):  # its node feeds nothing any more
      w[valid[:, r], r] = 0.0
      continue
    cands = [s for s in range(S - 1, -1, -1) if valid[s, r]]
    i = 0
    while i < len(cands):
      block = cands[i:i + chunk]
      trial = np.repeat(w[None], chunk, 0)
      for j, s in enumerate(block):
        trial[j:, s, r] = 0.0  # mask j removes block[0..j]
      losses = ev.loss(int(layer_of[r]), trial)
      prev = cur
      for j, s in enumerate(block):
        delta = float(losses[j]) - prev
        scores[s, r] = delta
        if delta < options.tau:
          w[s, r] = 0.0
          prev = float(losses[j])
        else:  # kept: the rest of this chain assumed its removal
          i += j + 1
          break
      else:
        i += len(block)
      cur = prev
  circuit = (w > 0) & valid
  return base.FitResult(np.where(valid, scores, 0.0), masks.clean_mean(cfg, params, dataset),
                        {"circuit": circuit, "final_loss": cur, "evaluation_calls": ev.calls,
                         "tau": options.tau, "metric": options.acdc_metric})


ACDC = base.Method(
    "ACDC", "ACDC: greedy edge removal from the logits backwards, removing an edge if it raises KL "
    "to the clean model (or the task metric's distance) by less than --tau; score = that change",
    None, ACDCOptions, fit=fit, convention="loss")
