"""Evaluation of position-level circuits: the metric when a circuit is a set of position edges.

A position circuit (`circuits.positions`: masks `local` [pos, sender, receiver] and `crossing`
[pair, sender, kv], 1 = in) keeps some edges at some positions. Its forward applies the graph
form's arithmetic (`models.edges`) per position:

- a local edge s -> r at position p (r a head's q input, an MLP or the logits): r's input at p is
  `resid_p - sum_{s out at p} (live_s[p] - ablated_s[p])`, live = this run's sender output;
- a crossing edge s@j -> h<k|v>@i: the key (value) input of head h *as read by query i* at key j is
  `resid_j - sum_{s out at (i, j)} (live_s[j] - ablated_s[j])`, so every query row has its own keys
  and values: [batch, query, key, head, d_model] inputs, a chunk of query rows at a time
  (`lax.map`), each row's z_i taken from the model's own attention (`Attention.attend`: masks,
  sliding windows, rotary, qk-norm and soft-caps are the model's).

Span circuits (`circuits.span_circuits`): with `owner` (Int [batch, pos], each position's span in
its row, -1 for none), `circuit_metric` takes span masks, `local` [span, sender, receiver] and
`crossing` [key_span, query_span, sender, kv], and reads each row's position masks from them (a
position edge is in iff the span edge it was aggregated into is; positions in no span are out):
rows of different layouts share one circuit and one compiled program. The k/v masks of one query
row are gathered inside the chunked loop, so memory stays that of the shared masks.

With every position instance of an edge-level circuit in (`circuits.positions.every_position`),
this is that circuit's metric (`circuit_forward.circuit_metric`); all edges in give the clean
model, none the fully ablated one (with patching, the corrupted run). The circuit is an array
argument, so one compiled program serves every circuit of a shape.

Memory per layer: the k/v inputs of a chunk of C query rows, `C x batch x pos x 2 H x d_model`
floats, plus their attention, `C x batch x H x pos^2`; C is the largest divisor of pos whose chunk
fits 64 MB. Compute: each query row reruns its head's attention over every query, so a layer's
attention costs pos times the plain forward's (`batch x pos^3 x H x d_head`), plus the k/v
projections `batch x pos^2 x 2 H x d_model x d_head`; the last layer computes only each row's
metric position (one set of keys and values per row). Fine for the small models and prompts
position-level circuits are built on: the bundled toy, 16 prompts of 32 positions, takes 0.13 s a
circuit warm (2.3 s with the compile) on a loaded 2-core CPU.

PEAP (Haklay et al. 2025) evaluates a crossing edge between spans by replacing the head's z rows of
the receiving span by `pattern . v` over the sending span's keys taken from the counterfactual run;
here an edge is one sender's share of one key's k or v input for one query, as it is scored.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp import circuits as G
from jaxinterp.attribution.ablation import POSITION_INTERVENTIONS, Ablation, make_ablation
from jaxinterp.attribution.base import AttributionError, check_finite
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.circuits.layout import check_count
from jaxinterp.circuits.schemas import SpanScores
from jaxinterp.evaluation.faithfulness import FaithfulnessCurve, normalize
from jaxinterp.models import edges as E
from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.sites import Sites
from jaxinterp.runtime import compile_policy, distributed
from jaxinterp.tasks import Batch, Dataset, Task
from jaxinterp.tasks.metrics import metric_at_last

Array = jax.Array
INTERVENTIONS = POSITION_INTERVENTIONS
"""The ablations a position circuit can be evaluated under (`ablation.POSITION_INTERVENTIONS`)."""
CHUNK_BYTES = 64e6  # the per-chunk k/v inputs and attention of `_query_chunk`


def check(cfg: ModelConfig, intervention: str) -> None:
  """AttributionError (one line) for a model or an intervention position circuits do not take."""
  if intervention not in INTERVENTIONS:
    raise AttributionError(f"position circuits are evaluated with intervention="
                           f"{', '.join(INTERVENTIONS)}, not {intervention!r}")
  if not cfg.causal:
    raise AttributionError("position circuits need a causal model (a crossing edge is a key "
                           "j <= query i); this one attends to later keys")


def _query_chunk(cfg: ModelConfig, batch: int, n_pos: int) -> int:
  per_row = 4.0 * batch * n_pos * cfg.n_heads * (2 * cfg.d_model + n_pos + 2 * cfg.d_head)
  size = max(1, min(n_pos, int(CHUNK_BYTES // per_row)))
  while n_pos % size:
    size -= 1
  return size


def _norm(cfg: ModelConfig, p, x: Array, method=None) -> Array:
  return T.Norm(cfg).apply({"params": p or {}}, x, method=method)


def _cut(delta: Array, out: Array, spec: str) -> Array:
  """sum_s out[..., s, ...] delta_s: the live - ablated differences of the senders outside."""
  return jnp.einsum(spec, delta, out.astype(delta.dtype))


def _attention(cfg: ModelConfig, li: int, blk, resid: Array, delta: Array, out_q: Array,
               out_kv, positions: Array, key_mask: Array, chunk: int,
               last: Array | None) -> Array:
  """Layer li's z, Float[Array, "batch pos head d_head"]: q inputs per position, k/v inputs per
  (query, key) pair (`out_q` [pos, n_up, H], `out_kv` [query, key, n_up, 2H]: 1 = ablated; per
  row, `out_q` [batch, pos, n_up, H] and `out_kv` a function of the query position(s), [] or
  [batch], giving [batch, key, n_up, 2H]).
  With `last` (Int[Array, "batch"], the last layer), only each row's metric position is computed
  (nothing downstream reads the others) and copied to every position."""
  H, attn = cfg.n_heads, blk["attn"]
  ln1 = blk.get("ln1")
  bias = {c: attn[f"b_{c}"] if cfg.attn_bias else 0.0 for c in "QKV"}
  q_in = _norm(cfg, ln1, resid[:, :, None] - _cut(delta, out_q, "bpsd,psh->bphd" if out_q.ndim == 3
                                                  else "bpsd,bpsh->bphd"))
  kv_of = out_kv if callable(out_kv) else out_kv.__getitem__
  q = jnp.einsum("bphd,hde->bphe", q_in, attn["W_Q"]) + bias["Q"]

  def attend(out):  # z of every query with keys and values read through `out` [b?, key, s, 2H]
    spec = "bjsd,bjsc->bjcd" if out.ndim == 4 else "bjsd,jsc->bjcd"
    kv_in = _norm(cfg, ln1, resid[:, :, None] - _cut(delta, out, spec))
    k = jnp.einsum("bjhd,hde->bjhe", kv_in[:, :, :H], attn["W_K"]) + bias["K"]
    v = jnp.einsum("bjhd,hde->bjhe", kv_in[:, :, H:], attn["W_V"]) + bias["V"]
    return T.Attention(cfg, li).apply({"params": attn}, q, k, v, positions=positions,
                                      key_mask=key_mask, sites=Sites(), method=T.Attention.attend)

  if last is not None:  # one query per row: its own keys and values
    z = jnp.take_along_axis(attend(kv_of(last)), last[:, None, None, None], 1)
    return jnp.broadcast_to(z, q.shape[:3] + z.shape[3:])

  def row(i):  # z of query i, with that row's own keys and values: [batch, head, d_head]
    return jax.lax.dynamic_index_in_dim(attend(kv_of(i)), i, 1, keepdims=False)

  z = jax.lax.map(row, jnp.arange(resid.shape[1]), batch_size=chunk)  # [query, batch, H, e]
  return jnp.moveaxis(z, 0, 1)


def _span_outs(local: Array, crossing: Array, owner: Array):
  """(local_out(s, r), kv_out(s, c)): the 1 = ablated masks of each row's positions read from span
  masks (`local` [span, sender, receiver], `crossing` [key_span, query_span, sender, kv]) through
  `owner` (Int [batch, pos], -1: in no span, so ablated), sliced by sender and receiver."""
  n_span = local.shape[0]
  own = jnp.where(owner < 0, n_span, owner).astype(jnp.int32)  # n_span: an all-out span
  local = jnp.concatenate([local, jnp.zeros((1,) + local.shape[1:], local.dtype)], 0)
  crossing = jnp.pad(crossing, ((0, 1), (0, 1), (0, 0), (0, 0)))
  keys = jnp.arange(own.shape[1])

  def local_out(s, r):  # [batch, pos, ...]
    return 1.0 - local[:, s, r][own]

  def kv_out(s, c):
    m = crossing[:, :, s, c]  # [key_span, query_span, n_up, 2H]

    def of(i):  # query position(s) i, [] or [batch] -> [batch, key, n_up, 2H]
      i = jnp.broadcast_to(i, own.shape[:1])
      out = 1.0 - m[own, jnp.take_along_axis(own, i[:, None], 1)]
      return jnp.where((keys[None] <= i[:, None])[:, :, None, None], out, 0.0)
    return of
  return local_out, kv_out


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "chunk"))
def circuit_metric(cfg: ModelConfig, task: Task, params, batch: Batch, ablated: Array,
                   clean_logits: Array | None, local: Array, crossing: Array,
                   chunk: int = 1, owner: Array | None = None) -> Array:
  """The metric summed over the batch's real rows under one position circuit.

  Args:
    cfg, params: the model with key/value heads ungrouped (`ungroup_kv`), causal.
    ablated: Float[Array, "batch pos sender d_model"], every sender's ablated output
      (`Ablation.values`).
    clean_logits: Float[Array, "batch 1 vocab"] at each last position, or None if the task does not
      read them.
    local: Float[Array, "pos sender receiver"], 1 = the edge at that position is in (k/v columns
      unused); crossing: Float[Array, "pair sender kv"], 1 = in (pairs packed, `pair_index`).
    chunk: query rows per step of the k/v inputs (a divisor of pos).
    owner: None, or Int[Array, "batch pos"], each position's span in its row (-1: none); then
      `local` is Float[Array, "span sender receiver"] and `crossing` Float[Array, "key_span
      query_span sender kv"], span masks (a span circuit, `circuits.span_circuits`).

  Returns:
    Float[Array, ""].
  """
  L, H = cfg.n_layers, cfg.n_heads
  n_pos = batch.clean.shape[1]
  key_mask = batch.mask.astype(bool)
  positions = T.positions_of(key_mask)
  if owner is None:
    out_local = 1.0 - local
    qi, kj = cpos.pairs(n_pos)
    out_cross = jnp.zeros((n_pos, n_pos) + crossing.shape[1:], crossing.dtype).at[qi, kj].set(
        1.0 - crossing)  # [query, key, sender, kv]; keys after the query are never read
    local_out = lambda s, r: out_local[:, s, r]  # noqa: E731
    kv_out = lambda s, c: out_cross[:, :, s, c]  # noqa: E731
  else:
    local_out, kv_out = _span_outs(local, crossing, owner)
  live = T.embed_inputs(cfg, params, batch.clean, batch.mask)
  dtype = live.dtype
  delta = (live - ablated[:, :, 0].astype(dtype))[:, :, None]  # [batch, pos, sender, d_model]
  resid = live
  for li in range(L):
    blk = params[f"blocks_{li}"]
    n_up, r_q = E.n_upstream_of_attn(cfg, li), E.head_receiver(cfg, li, 0, "q")
    z = _attention(cfg, li, blk, resid, delta, local_out(slice(None, n_up), slice(r_q, r_q + H)),
                   kv_out(slice(None, n_up), slice(2 * H * li, 2 * H * (li + 1))), positions,
                   key_mask, chunk, batch.last.astype(jnp.int32) if li == L - 1 else None)
    result = jnp.einsum("bphe,hed->bphd", z, blk["attn"]["W_O"])  # the heads' sender values
    attn_out = result.sum(2) + (blk["attn"]["b_O"] if cfg.attn_out_bias else 0.0)
    if cfg.post_norms:  # linear given the layer's scale: split over the heads (as the graph form)
      result = result * _norm(cfg, blk["ln1_post"], attn_out, T.Norm.scale)[:, :, None]
      attn_out = _norm(cfg, blk["ln1_post"], attn_out)
    s0 = E.head_sender(cfg, li, 0)
    delta = jnp.concatenate([delta, result.astype(dtype) - ablated[:, :, s0:s0 + H]], 2)
    mlp_resid = resid if cfg.parallel_attn_mlp else resid + attn_out
    n_mlp, r_mlp = E.n_upstream_of_mlp(cfg, li), E.mlp_receiver(cfg, li)
    m_mlp = local_out(slice(None, n_mlp), r_mlp)
    x = mlp_resid - _cut(delta[:, :, :n_mlp], m_mlp, "bpsd,ps->bpd" if m_mlp.ndim == 2
                         else "bpsd,bps->bpd")
    mlp = T.MLP(cfg, li).apply({"params": blk["mlp"]}, _norm(cfg, blk.get("ln2"), x), Sites())
    if cfg.post_norms:
      mlp = _norm(cfg, blk["ln2_post"], mlp)
    s_mlp = E.mlp_sender(cfg, li)
    delta = jnp.concatenate([delta, (mlp.astype(dtype) - ablated[:, :, s_mlp])[:, :, None]], 2)
    resid = mlp_resid + mlp if not cfg.parallel_attn_mlp else resid + attn_out + mlp
  m_out = local_out(slice(None), E.logits_receiver(cfg))
  x = resid - _cut(delta, m_out, "bpsd,ps->bpd" if m_out.ndim == 2 else "bpsd,bps->bpd")
  total, _ = metric_at_last(cfg, task, params, batch, _norm(cfg, params.get("ln_final"), x),
                            clean_logits)
  return total


@flax.struct.dataclass
class Prepared:
  """What every position circuit of one batch shares.

  Attributes:
    ablated: Float[Array, "batch pos sender d_model"], the senders' ablated outputs.
    clean_logits: Float[Array, "batch 1 vocab"], the clean model's logits at each last position.
  """

  ablated: Array
  clean_logits: Array


@functools.partial(compile_policy.jit, static_argnames=("cfg",))
def prepare(cfg: ModelConfig, params, batch: Batch, ablation: Ablation) -> Prepared:
  """The ablated sender outputs (a corrupted run with patching) and the clean last-position logits
  of a batch."""
  _, cache = T.forward(cfg, params, batch.clean, attention_mask=batch.mask,
                       collect=("ln_final.hook_normalized",))
  clean = T.last_token_logits(cfg, params, cache["ln_final.hook_normalized"], batch.last)
  return Prepared(ablation.values(cfg, params, batch), clean)


@jax.jit
def _top(rank_local: Array, rank_cross: Array, n: Array) -> tuple[Array, Array]:
  return (rank_local < n).astype(jnp.float32), (rank_cross < n).astype(jnp.float32)


class PositionCircuitForward:
  """Evaluate many position circuits on one model: `prepare` once per batch (padded to the
  dataset's longest prompt, `Dataset.batches(..., bucket=None)`), then `metric` per circuit."""

  def __init__(self, cfg: ModelConfig, params, task: Task, chunk: int | None = None):
    self.cfg, self.params = T.ungroup_kv(cfg, params)  # the graph's heads: GQA ungrouped
    self.task, self.chunk = task, chunk

  def prepare(self, batch: Batch, ablation: Ablation) -> Prepared:
    """What every circuit of `batch` shares (module-level `prepare`)."""
    return prepare(self.cfg, self.params, batch, ablation)

  def metric(self, batch: Batch, prep: Prepared, local, crossing, owner=None) -> Array:
    """Metric sum over the batch's real rows for the circuit (`local`, `crossing`), masks over the
    batch's positions, or with `owner` (Int [batch, pos], each position's span, -1: none) span
    masks [span, sender, receiver] and [key_span, query_span, sender, kv]; a device scalar."""
    b, p = batch.clean.shape
    S, kv = E.n_senders(self.cfg), 2 * self.cfg.n_layers * self.cfg.n_heads
    n = np.shape(local)[0] if owner is not None else None
    want = ([(p, S, E.n_receivers(self.cfg)), (p * (p + 1) // 2, S, kv)] if owner is None
            else [(n, S, E.n_receivers(self.cfg)), (n, n, S, kv)])
    if [tuple(np.shape(local)), tuple(np.shape(crossing))] != want or (
        owner is not None and tuple(np.shape(owner)) != (b, p)):
      raise AttributionError(f"the circuit's masks have shapes {np.shape(local)}, "
                             f"{np.shape(crossing)}; a batch of {p} positions needs {want}")
    clean = prep.clean_logits if self.task.needs_clean_logits else None
    return circuit_metric(self.cfg, self.task, self.params, batch, prep.ablated, clean,
                          jnp.asarray(local, jnp.float32), jnp.asarray(crossing, jnp.float32),
                          chunk=self.chunk or _query_chunk(self.cfg, b, p),
                          **({} if owner is None else {"owner": jnp.asarray(owner, jnp.int32)}))


def _means(cfg: ModelConfig, params, dataset: Dataset, n_circuits: int, masks_of, *,
           intervention: str, batch_size: int, ablation: Ablation | None, quiet: bool,
           chunk: int | None, owner: np.ndarray | None = None) -> np.ndarray:
  """Mean metric over `dataset` of circuits 0..n_circuits-1 (`masks_of(c)` -> (local, crossing),
  device or host arrays; span masks with `owner`, Int [row, pos]): float64 [n_circuits]."""
  check(cfg, ablation.kind if ablation is not None else intervention)
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  fwd = PositionCircuitForward(cfg, params, dataset.task, chunk)
  batches = list(dataset.batches(batch_size, bucket=None))
  steps = distributed.n_owned(len(batches)) * n_circuits
  bar = tqdm(total=steps, desc="evaluating position circuits",
             disable=quiet or steps < 4 or not distributed.is_writer(), leave=False)

  def one(i, batch):  # process p of N runs batches p, p + N, ... (`distributed.sum_split`)
    prep = fwd.prepare(batch, ablation)
    rows = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), len(dataset) - 1)
    own = {} if owner is None else {"owner": jnp.asarray(owner[rows])}  # as `Dataset.batches`
    sums = []
    for c in range(n_circuits):
      sums.append(fwd.metric(batch, prep, *masks_of(c), **own))
      bar.update(1)
    out = np.asarray(jnp.stack(sums), np.float64)
    check_finite(out, i, "the position circuit metric")
    return out

  totals = distributed.sum_split(batches, one, np.zeros(n_circuits, np.float64))
  bar.close()
  return totals / len(dataset)


def evaluate_position_circuits(cfg: ModelConfig, params, dataset: Dataset,
                               circuits: Sequence[tuple[np.ndarray, np.ndarray]], *,
                               intervention: str = "patching", batch_size: int = 16,
                               ablation: Ablation | None = None, quiet: bool = False,
                               chunk: int | None = None) -> np.ndarray:
  """Mean metric over `dataset` of each position circuit.

  Args:
    circuits: (local [pos, sender, receiver], crossing [pair, sender, kv]) masks, 1 = in
      (`circuits.positions.circuit_masks`, `every_position`), over the dataset's positions.
    intervention: how edges outside the circuit are ablated (`INTERVENTIONS`).
    chunk: query rows per step of the per-query k/v inputs (None: by memory, 64 MB).

  Returns:
    float64 [len(circuits)].
  """
  circuits = list(circuits)
  return _means(cfg, params, dataset, len(circuits), lambda c: circuits[c],
                intervention=intervention, batch_size=batch_size, ablation=ablation, quiet=quiet,
                chunk=chunk)


def top_n_metrics(cfg: ModelConfig, params, dataset: Dataset, scores: cpos.PositionScores,
                  sizes: Sequence[int], *, absolute: bool = True, intervention: str = "patching",
                  batch_size: int = 16, ablation: Ablation | None = None, quiet: bool = False,
                  chunk: int | None = None) -> np.ndarray:
  """Mean metric of the top-n position circuits (`scores.select(n, absolute)`, nested) for each n
  in `sizes`, float64 [len(sizes)]. The masks are made on the device from the edges' ranks."""
  if scores.n_pos != dataset.clean.shape[1]:
    raise AttributionError(f"the scores have {scores.n_pos} positions, the dataset "
                           f"{dataset.clean.shape[1]}")
  ranks = tuple(jnp.asarray(r) for r in cpos.selection_ranks(scores, absolute))
  sizes = [check_count(n, scores.n_edges, "circuit size") for n in sizes]
  return _means(cfg, params, dataset, len(sizes),
                lambda c: _top(*ranks, jnp.asarray(sizes[c], jnp.int32)),
                intervention=intervention, batch_size=batch_size, ablation=ablation, quiet=quiet,
                chunk=chunk)


def faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: cpos.PositionScores,
                       *, n_edges: Sequence[int] | None = None,
                       percentages: Sequence[float] | None = None, absolute: bool = True,
                       intervention: str = "patching", batch_size: int = 16, quiet: bool = False,
                       ablation: Ablation | None = None,
                       chunk: int | None = None) -> FaithfulnessCurve:
  """Faithfulness of the top-n position circuits for several n, and the two baselines (every
  position edge in, none in), in one pass: the edge level's `FaithfulnessCurve` (sizes as counts
  `n_edges` or percentages of the position edges, default MIB's). Position circuits are not
  pruned: `n_edges_kept` is `n_edges`."""
  n_total = scores.n_edges
  n_edges, percentages = G.mib.sizes_and_percentages(n_total, counts=n_edges,
                                                     percentages=percentages)
  metric = top_n_metrics(cfg, params, dataset, scores, [n_total, 0, *n_edges], absolute=absolute,
                         intervention=intervention, batch_size=batch_size, ablation=ablation,
                         quiet=quiet, chunk=chunk)
  m_full, m_empty, metric = float(metric[0]), float(metric[1]), metric[2:]
  return FaithfulnessCurve(np.asarray(n_edges), np.asarray(n_edges),
                           np.asarray(percentages, np.float64), metric,
                           normalize(metric, m_full, m_empty), m_full, m_empty)


def mib_scores(cfg: ModelConfig, params, dataset: Dataset, scores: cpos.PositionScores, *,
               intervention: str = "patching", batch_size: int = 16,
               ablation: Ablation | None = None) -> dict[str, float]:
  """MIB's CPR (area under f, signed ranking) and CMD (area under |1 - f|, absolute ranking) of
  position circuits, as `faithfulness.mib_scores` defines them for edges: circuits of
  `circuits.MIB_PERCENTAGES` of the position edges."""
  pcts = list(G.MIB_PERCENTAGES)
  signed, absolute = (faithfulness_curve(cfg, params, dataset, scores, percentages=pcts,
                                         absolute=a, intervention=intervention,
                                         batch_size=batch_size, ablation=ablation, quiet=True)
                      for a in (False, True))
  return {"CPR": G.cpr(pcts, signed.faithfulness), "CMD": G.cmd(pcts, absolute.faithfulness)}



def evaluate_span_circuits(cfg: ModelConfig, params, dataset: Dataset,
                           circuits: Sequence[tuple[np.ndarray, np.ndarray]], spans: np.ndarray,
                           **kw) -> np.ndarray:
  """Mean metric over `dataset` of each span circuit: span masks (local [span, sender, receiver],
  crossing [key_span, query_span, sender, kv], 1 = in; `circuits.span_circuits.circuit_masks`),
  each row's position edges in as its spans Int [row, span, 2] say (`span_circuits.row_masks`).
  Keywords as `evaluate_position_circuits`. Returns float64 [len(circuits)]."""
  circuits = list(circuits)
  return _means(cfg, params, dataset, len(circuits), lambda c: circuits[c],
                owner=SC.owners(spans, dataset.clean.shape[1]), **_keywords(kw))


def _keywords(kw: dict) -> dict:
  return dict(dict(intervention="patching", batch_size=16, ablation=None, quiet=False,
                   chunk=None), **kw)


def span_faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: SpanScores,
                            spans: np.ndarray, *, n_edges: Sequence[int], absolute: bool = True,
                            **kw) -> FaithfulnessCurve:
  """Faithfulness of the top-n span circuits (`span_circuits.select(scores, n, absolute)`) for
  each n in `n_edges`, and the two baselines (every span edge in, none), in one pass; keywords as
  `evaluate_position_circuits`. Percentages are of the span edges."""
  n_total = SC.n_edges(scores)
  sizes = [check_count(n, n_total, "circuit size") for n in n_edges]
  ranks = tuple(jnp.asarray(r) for r in SC.selection_ranks(scores, absolute))
  every = [n_total, 0, *sizes]
  metric = _means(cfg, params, dataset, len(every),
                  lambda c: _top(*ranks, jnp.asarray(every[c], jnp.int32)),
                  owner=SC.owners(spans, dataset.clean.shape[1]), **_keywords(kw))
  m_full, m_empty, metric = float(metric[0]), float(metric[1]), metric[2:]
  return FaithfulnessCurve(np.asarray(sizes), np.asarray(sizes),
                           100.0 * np.asarray(sizes, np.float64) / max(n_total, 1), metric,
                           normalize(metric, m_full, m_empty), m_full, m_empty)
