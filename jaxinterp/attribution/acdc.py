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

Each trial is one call of the circuit forward (`evaluation.circuit_forward.circuit_metric` with
`start`: a loop over the layers from the receiver's, which is data, computing only the nodes the
circuit reads), so every trial of every receiver runs one compiled program (configs the circuit
forward does not support, post-norms that are LayerNorms or carry a bias, are refused). While the
receivers of layer l are visited, every edge into an earlier layer is still present, so everything
upstream of layer l is the clean run: each trial starts at layer l, from a buffer holding the clean
run's (live - ablated) sender rows (kept per batch: a trial overwrites only the rows of layers >= l,
and the receivers are visited from the last layer down). The edges into a receiver are tried one at
a time, as in ACDC.

Scores: Delta of each edge when it was tried (in L's units; positive = removing it moved the circuit
away from the full model; the kept edges are those with Delta >= tau), 0 for edges never tried.
`extras["circuit"]` is ACDC's circuit (Bool [n_senders, n_receivers]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, masks
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import sender_outputs
from jaxinterp.runtime import compile_policy, distributed
from jaxinterp.tasks import Task, metrics

METRICS = ("kl", "task")


@dataclasses.dataclass(frozen=True)
class ACDCOptions(base.Options):
  """Options of ACDC.

  Attributes:
    tau: the threshold: an edge is removed if removing it raises L by less than tau (> 0).
    acdc_metric: "kl" (KL(clean || circuit), nats) or "task" (|m(circuit) - m(full)|).
    acdc_batch: examples per evaluation call (None: up to 64).
  """

  tau: float = 0.01
  acdc_metric: str = "kl"
  acdc_batch: int | None = None

  def __post_init__(self):
    super().__post_init__()
    masks.positive_float("tau", self.tau)
    if self.acdc_metric not in METRICS:
      raise base.AttributionError(f"acdc_metric must be one of {METRICS}, got "
                                  f"{self.acdc_metric!r}")
    if self.acdc_batch is not None:
      masks.positive_int("acdc_batch", self.acdc_batch)


def _kl(logits, batch, clean_logits):
  return metrics.kl_divergence(logits, clean_logits, batch.last)


KL = Task("acdc:kl", _kl, needs_clean_logits=True, higher_is_better=False,
          description="KL(clean || circuit) at the last real token, in nats")


@functools.partial(compile_policy.jit, static_argnames=("cfg",))
def clean_deltas(cfg, params, batch, prep: CF.Prepared):
  """The clean run's live - ablated output of every sender, the circuit forward's buffer with every
  edge present: Float[Array, "sender batch pos d_model"]."""
  live = jnp.moveaxis(sender_outputs(cfg, params, batch.clean, batch.mask), 2, 0)
  return live.astype(prep.ablated.dtype) - prep.ablated


class _Evaluator:
  """L(circuit) over the whole dataset, one circuit forward per batch.

  Several processes (`runtime.distributed`): process p prepares and runs batches p, p + N, ...
  only, and each trial's sums are added in batch order on every process
  (`distributed.sum_split`), so every process takes the same decisions, and they are one
  process's, bitwise."""

  def __init__(self, cfg, params, dataset, ablation, options: ACDCOptions):
    self.options = options
    task = KL if options.acdc_metric == "kl" else dataset.task
    self.fwd = fwd = CF.CircuitForward(cfg, params, task, valid_edges(cfg))
    bs = min(options.acdc_batch or 64, len(dataset))
    self.batches = []
    for i, b in enumerate(dataset.batches(bs, bucket=None)):  # only the batches it runs
      prep = CF.prepare(fwd.cfg, task, fwd.params, b, ablation) if distributed.owns(i) else None
      state = [prep, clean_deltas(fwd.cfg, fwd.params, b, prep)] if prep is not None else None
      self.batches.append((b, state))
    self.n = len(dataset)
    self.calls = 0
    self.m_full = None
    if options.acdc_metric == "task":
      self.m_full = self._mean(fwd.cfg.n_layers, np.ones(fwd.valid.shape, np.float32))

  def _mean(self, layer, w):
    w, start = jnp.asarray(np.where(self.fwd.valid, w, 0.0).astype(np.float32)), jnp.int32(layer)

    def one(_, item):
      batch, state = item  # state: [prep, the sender buffer, its rows before `layer` clean]
      total, state[1] = CF.circuit_metric(self.fwd.cfg, self.fwd.task, self.fwd.params, batch,
                                          state[0], w, state[1], self.fwd.stacked, start)
      return np.float64(total)

    total = distributed.sum_split(self.batches, one, np.float64(0.0))
    self.calls += 1
    return float(total / self.n)

  def loss(self, layer: int, w: np.ndarray) -> float:
    """L of the circuit w [S, R], whose edges into layers < `layer` must all be present."""
    mean = self._mean(layer, w)
    return mean if self.m_full is None else abs(mean - self.m_full)


def fit(cfg: ModelConfig, params, dataset, ablation, options: ACDCOptions) -> base.FitResult:
  """Run ACDC on `dataset`; scores are the Delta measured when each edge was tried."""
  if len(dataset) == 0:
    raise base.AttributionError("the dataset is empty")
  if not CF.supported(cfg):
    raise base.AttributionError("ACDC runs its trials with the circuit forward, which does not "
                                "support post-norms that are LayerNorms or have an output bias")
  valid = valid_edges(cfg)
  S, R = valid.shape
  owner = Graph.from_config(cfg).receiver_node
  ev = _Evaluator(cfg, params, dataset, ablation, options)
  w = np.ones((S, R), np.float32)
  scores = np.zeros((S, R), np.float64)
  layer_of = np.minimum(np.arange(R) // (3 * cfg.n_heads + 1), cfg.n_layers)
  cur = ev.loss(cfg.n_layers, w)
  for r in tqdm(range(R - 1, -1, -1), desc="ACDC receivers", disable=not options.progress,
                leave=False):
    node = owner[r]
    if node < S and not np.any(w[node] * valid[node]):  # its node feeds nothing any more
      w[valid[:, r], r] = 0.0
      continue
    for s in range(S - 1, -1, -1):  # the latest sender first
      if not valid[s, r]:
        continue
      w[s, r] = 0.0
      loss = ev.loss(int(layer_of[r]), w)
      scores[s, r] = loss - cur
      if scores[s, r] < options.tau:
        cur = loss  # removed
      else:
        w[s, r] = 1.0
  circuit = (w > 0) & valid
  return base.FitResult(np.where(valid, scores, 0.0), masks.clean_mean(cfg, params, dataset),
                        {"circuit": circuit, "final_loss": cur, "evaluation_calls": ev.calls,
                         "tau": options.tau, "metric": options.acdc_metric})


ACDC = base.Method(
    "ACDC", "ACDC: greedy edge removal from the logits backwards, removing an edge if it raises KL "
    "to the clean model (or the task metric's distance) by less than --tau; score = that change",
    None, ACDCOptions, fit=fit, convention="loss")
