"""Exact activation patching of every edge: m(edge ablated) - m(clean), one edge at a time.

No approximation: for each valid edge s -> r the model is rerun with only that receiver's input
moved to `x_r - (clean_s - ablated_s)`. The rerun starts at the receiver's layer from the cached
clean run, unembeds only the last position, and many edges run in one compiled call (`vmap` over
edges, in memory-sized chunks). With patching, the positions before a row's first clean/corrupted
difference are not rerun: no edge changes anything there, so each rerun covers only the row's
suffix, attending to the clean run's keys and values before it (`shared_prefix`). Scores are in
the metric's units.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, receiver_grads
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.sites import Sites
from jaxinterp.models.transformer import (
  Block,
  LayerStart,
  Norm,
  forward,
  positions_of,
  stack_blocks,
  ungroup_kv,
)
from jaxinterp.runtime import compile_policy, shared_prefix
from jaxinterp.tasks import metrics as task_metrics


@dataclasses.dataclass(frozen=True)
class ExactOptions(base.Options):
  """Options of exact patching.

  Attributes:
    exact_chunk: edges (or nodes) per compiled call (`vmap`); None: as many as fit, see
      `exact_chunk_size`.
    level: "edge", or "node" (exact node patching: every outgoing edge of the node ablated at
      once, as `eap`'s `attribute_node`); "neuron" is refused (d_model reruns per node).
  """

  exact_chunk: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.level == "neuron":
      raise base.AttributionError("exact patching has no neuron level (it would rerun the model "
                                  "once per output dimension of every node); use level='node', or "
                                  "EAP / EAP-IG-inputs at level='neuron'")
    if self.exact_chunk is not None and (not isinstance(self.exact_chunk, int)
                                         or self.exact_chunk < 1):
      raise base.AttributionError(f"exact_chunk must be a positive integer, got "
                                  f"{self.exact_chunk!r}")


@functools.partial(compile_policy.jit, static_argnames=("cfg", "suffix"))
def upstream_cache(cfg, params, batch, ablation, suffix: int | None = None):
  """The clean run's inputs of every layer's receivers, and the sender (clean - ablated) deltas.

  Returns (resids Float[Array, "layer+1 batch pos d_model"]: the residual stream entering each block
  and the final norm; mlp_inputs Float[Array, "layer batch pos d_model"]: each MLP's input before
  its norm; delta Float[Array, "batch pos sender d_model"]; kv_prefix). With one edge into layer l
  ablated, everything before that receiver is the clean run.

  With a `suffix` width (`shared_prefix.plan`, patching), "pos" is each row's suffix from its first
  clean/corrupted difference on, and kv_prefix is the clean run's keys and values before it
  (`KVPrefix` with a leading layer axis, heads as in `cfg`): delta is zero on the shared prefix, so
  no rerun changes anything there. Without one, kv_prefix is None.
  """
  L = cfg.n_layers
  mid = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
  names = [f"blocks.{li}.hook_resid_pre" for li in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
  mlp_names = [f"blocks.{li}.{mid}" for li in range(L)]
  kv_names = ([f"blocks.{li}.{n}" for li in range(L) for n in shared_prefix.KV_SITES]
              if suffix is not None else [])
  ablated = ablation.values(cfg, params, batch)
  _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                     edges=EdgePatch(None, None),
                     collect=tuple(dict.fromkeys(names + mlp_names + kv_names)) + ("hook_senders",))
  resids = jnp.stack([cache[n] for n in names])
  mlp_inputs = jnp.stack([cache[n] for n in mlp_names])
  delta = cache["hook_senders"] - ablated
  if suffix is None:
    return resids, mlp_inputs, delta, None
  sfx = shared_prefix.Suffix.of(batch, suffix)
  kv = [jnp.stack([cache[f"blocks.{li}.{n}"] for li in range(L)]) for n in shared_prefix.KV_SITES]
  return sfx.take(resids, 2), sfx.take(mlp_inputs, 2), sfx.take(delta), sfx.prefix(*kv)


def suffix(cfg, batch, ablation):
  """(suffix width or None, the batch the reruns see, their position ids or None): with a shared
  clean/corrupted prefix (`shared_prefix.plan`), the reruns run each row's suffix only."""
  width = shared_prefix.plan(cfg, batch, ablation.kind)
  if width is None:
    return None, batch, None
  sfx = shared_prefix.Suffix.of(batch, width)
  return width, sfx.batch(batch), sfx.positions


def _own_kv(cfg, params, kv_prefix):
  """(cfg, params, kv_prefix) with grouped k/v heads repeated per query head: a query head's k/v
  input is its own (`ungroup_kv`), and so are its clean keys and values."""
  rep = cfg.n_heads // cfg.kv_heads
  cfg, params = ungroup_kv(cfg, params)
  if kv_prefix is not None and rep > 1:
    kv_prefix = kv_prefix.replace(k=jnp.repeat(kv_prefix.k, rep, -2),
                                  v=jnp.repeat(kv_prefix.v, rep, -2))
  return cfg, params, kv_prefix


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "layer"))
def edge_chunk(cfg, task, layer, params, batch, resid, mlp_input, delta_prefix, senders,
               receivers, clean_logits, positions=None, kv_prefix=None):
  """Metric sums with one edge (senders[i] -> receivers[i], all into `layer`) ablated at a time.

  Each copy (`vmap` over the edges) is the plain fused-head forward from `layer` on, started from
  the clean run's residual stream, with the one receiver's input x_r moved to x_r - delta_s:
  a head's q/k/v input changes that head's q/k/v by `(norm(x - delta) - norm(x)) W[h]` (added at
  `attn.hook_q/k/v`), an MLP input changes its normalised input by `norm(x - delta) - norm(x)`
  (at `ln2.hook_normalized`), and the logits input is the final residual minus delta. Nothing
  else is recomputed before `layer`, no per-head inputs are formed, and the metric reads only the
  last position's logits. `clean_logits` are last-position logits [batch, 1, vocab] (or None).
  With `positions` and `kv_prefix` (`upstream_cache` with a suffix), the arrays and `batch` hold
  each row's suffix only, which attends to the clean run's keys and values before it.
  Returns Float[Array, "chunk"].
  """
  cfg, params, kv_prefix = _own_kv(cfg, params, kv_prefix)
  L, H = cfg.n_layers, cfg.n_heads

  def norm(p, x):
    return Norm(cfg).apply({"params": p}, x)

  if layer == L:  # the logits receiver: only the final norm runs
    def one(s, r):
      x = norm(params.get("ln_final", {}), resid - delta_prefix[:, :, s])
      return task_metrics.metric_at_last(cfg, task, params, batch, x, clean_logits)[0]
    return jax.vmap(one)(senders, receivers)

  blk = params[f"blocks_{layer}"]
  ln1, ln2 = blk.get("ln1", {}), blk.get("ln2", {})  # {}: the param-free identity norm
  W = jnp.concatenate([blk["attn"][f"W_{c}"] for c in "QKV"])  # [3H, d, d_head]
  y_attn, y_mlp = norm(ln1, resid), norm(ln2, mlp_input)
  start = LayerStart(layer, resid, positions=positions, kv_prefix=kv_prefix)
  p = f"blocks.{layer}."

  def one(s, r):
    local = r - E.head_receiver(cfg, layer, 0, "q")  # 0..3H-1: q/k/v of a head; 3H: the MLP
    delta = delta_prefix[:, :, s]
    is_head = local < 3 * H
    d_attn = (norm(ln1, resid - delta) - y_attn) @ W[jnp.minimum(local, 3 * H - 1)]
    d_qkv = jnp.where((jnp.arange(3 * H) == local)[None, None, :, None], d_attn[:, :, None], 0.0)
    d_mlp = jnp.where(is_head, 0.0, norm(ln2, mlp_input - delta) - y_mlp)
    iv = {p + f"attn.hook_{c}": base.Shift(d_qkv[:, :, i * H:(i + 1) * H])
          for i, c in enumerate("qkv")}
    iv[p + "ln2.hook_normalized"] = base.Shift(d_mlp)
    _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask, interventions=iv,
                       start=start, collect=("ln_final.hook_normalized",))
    return task_metrics.metric_at_last(cfg, task, params, batch, cache["ln_final.hook_normalized"],
                               clean_logits)[0]

  return jax.vmap(one)(senders, receivers)


def scan_layers(cfg: ModelConfig, params) -> bool:
  """Whether `_exact_batch` reruns the edges into every block with one program (`edge_chunk_scan`,
  blocks as a `lax.scan`) rather than one program per receiver layer (`edge_chunk`): blocks of one
  structure whose stacked weights fit (`receiver_grads.scan_blocks_fits`)."""
  return cfg.n_layers > 1 and receiver_grads.scan_blocks_fits(cfg, params)


@functools.partial(jax.jit, static_argnames=("cfg",))
def stacked_blocks(cfg, params):
  """The blocks' weights for `edge_chunk_scan`, GQA ungrouped (`ungroup_kv`), stacked on a leading
  layer axis: made once per batch, not once per chunk of edges."""
  return stack_blocks(*ungroup_kv(cfg, params))


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task"))
def edge_chunk_scan(cfg, task, params, stacked, batch, layer, resids, mlp_inputs, delta, senders,
                    receivers, clean_logits, positions=None, kv_prefix=None):
  """`edge_chunk` for edges into the blocks, with the receiver's `layer` as data: one program for
  every layer < n_layers (the logits receiver keeps `edge_chunk`), so a model compiles 1 program
  here instead of n_layers.

  The receiver's block (its weights picked by `layer`) starts from the clean residual
  `resids[layer]` with the receiver's q/k/v or normalised-MLP-input change added; the blocks after
  it run as one `lax.scan` over all layers in which the blocks up to `layer` are skipped
  (`lax.cond`: the carry passes through). The arithmetic per rerun is `edge_chunk`'s; the blocks
  are compiled once, so XLA may fuse them differently and the metric may differ from
  `edge_chunk`'s by float rounding (measured: docs/performance.md, "Compile time").

  Args:
    stacked: `stacked_blocks(cfg, params)`.
    layer: Int[Array, ""], the receivers' layer (every edge of the chunk goes into it).
    resids, mlp_inputs, delta, kv_prefix: `upstream_cache`'s outputs, whole ([layer+1, ...],
      [layer, ...], [batch, pos, sender, d_model]; the KVPrefix with its leading layer axis).
    senders, receivers: Int[Array, "chunk"]; clean_logits, positions: as `edge_chunk`'s.

  Returns Float[Array, "chunk"].
  """
  cfg, params, kv_prefix = _own_kv(cfg, params, kv_prefix)
  H = cfg.n_heads
  blk = jax.tree.map(lambda a: a[layer], stacked)

  def norm(p, x):
    return Norm(cfg).apply({"params": p}, x)

  ln1, ln2 = blk.get("ln1", {}), blk.get("ln2", {})  # {}: the param-free identity norm
  W = jnp.concatenate([blk["attn"][f"W_{c}"] for c in "QKV"])  # [3H, d, d_head]
  resid, mlp_input = resids[layer], mlp_inputs[layer]  # [batch, pos, d_model]
  y_attn, y_mlp = norm(ln1, resid), norm(ln2, mlp_input)
  key_mask = batch.mask.astype(bool)
  pos = positions_of(key_mask) if positions is None else positions
  local = _layer_types(cfg)
  kv_at, local_at = jax.tree.map(lambda a: a[layer], (kv_prefix, local))

  def one(s, r):
    local_r = r - layer * (3 * H + 1)  # 0..3H-1: q/k/v of a head; 3H: the MLP
    d = delta[:, :, s]
    is_head = local_r < 3 * H
    d_attn = (norm(ln1, resid - d) - y_attn) @ W[jnp.minimum(local_r, 3 * H - 1)]
    d_qkv = jnp.where((jnp.arange(3 * H) == local_r)[None, None, :, None], d_attn[:, :, None], 0.0)
    d_mlp = jnp.where(is_head, 0.0, norm(ln2, mlp_input - d) - y_mlp)

    iv = {f"blocks.0.attn.hook_{c}": base.Shift(d_qkv[:, :, i * H:(i + 1) * H])
          for i, c in enumerate("qkv")}
    iv["blocks.0.ln2.hook_normalized"] = base.Shift(d_mlp)
    x = Block(cfg, 0).apply({"params": blk}, resid, pos, key_mask, Sites(iv), None, kv_at,
                            local_at)  # the receiver's block

    return _after(cfg, task, params, stacked, batch, layer, x, pos, key_mask, kv_prefix, local,
                  clean_logits)

  return jax.vmap(one)(senders, receivers)


def _after(cfg, task, params, stacked, batch, layer, x, pos, key_mask, kv_prefix, local,
           clean_logits):
  """The metric of a rerun whose block `layer` (traced) output is `x`: the blocks after it as one
  `lax.scan` over every layer, the blocks up to `layer` skipped (`lax.cond`: the carry passes
  through), then the final norm and the metric at the last position."""

  def body(x, xs_l):
    li, p_l, kv_l, local_l = xs_l

    def block(x):
      return Block(cfg, 0).apply({"params": p_l}, x, pos, key_mask, Sites(), None, kv_l, local_l)

    return jax.lax.cond(li > layer, block, lambda x: x, x), None

  x, _ = jax.lax.scan(body, x, (jnp.arange(cfg.n_layers), stacked, kv_prefix, local))
  x = Norm(cfg).apply({"params": params.get("ln_final", {})}, x)
  return task_metrics.metric_at_last(cfg, task, params, batch, x, clean_logits)[0]


def _layer_types(cfg):
  """Each layer's type (sliding or not) as data for the scan, or None."""
  if not cfg.layer_types_as_data:
    return None
  return jnp.asarray([li in cfg.sliding_layers for li in range(cfg.n_layers)])


def exact_chunk_size(cfg: ModelConfig, batch_size: int, n_pos: int,
                     budget_bytes: float | None = None) -> int:
  """Edges per vmapped exact-patching call so that the copies' activations fit in `budget_bytes`.

  Each copy holds about one plain forward's activations of the blocks it reruns (residual stream,
  norms, q/k/v, attention pattern, MLP activations) and the last position's logits, in float32. The
  default budget is a quarter of the accelerator's memory, or 4 GB where the device does not report
  it (CPU).
  """
  if budget_bytes is None:
    budget_bytes = base.chunk_budget_bytes()
  per_layer = base.block_floats_per_position(cfg, n_pos)
  per_copy = 4.0 * batch_size * (n_pos * per_layer * cfg.n_layers + cfg.d_vocab)
  return int(max(1, min(256, budget_bytes // per_copy)))


def _exact_batch(cfg, task, ablation, params, batch, valid, clean_total, clean_logits, chunk,
                 quiet):
  """Sum over the batch of m(edge ablated) - m(clean), for every valid edge (float64
  [n_senders, n_receivers]).

  Edges are grouped by their receiver's layer; each group reruns only the blocks from that layer on,
  from the clean run's cached upstream activations, `chunk` edges per vmapped call.
  """
  if clean_logits is not None:  # the kernel reads last-position logits only
    clean_logits = jnp.take_along_axis(clean_logits, batch.last[:, None, None], axis=1)
  width, run, positions = suffix(cfg, batch, ablation)
  resids, mlp_inputs, delta, kv_prefix = upstream_cache(cfg, params, batch, ablation, width)
  if chunk is None:
    chunk = exact_chunk_size(cfg, *run.clean.shape)
  s_idx, r_idx = np.nonzero(valid)
  layer_of = np.minimum(r_idx // (3 * cfg.n_heads + 1), cfg.n_layers)
  out = np.zeros(valid.shape, np.float64)
  work = [(li, np.flatnonzero(layer_of == li)) for li in range(cfg.n_layers + 1)]
  bar = tqdm(total=sum(-(-len(e) // chunk) for _, e in work), desc="exact: edge chunks",
             disable=quiet, leave=False)
  # One program for the edges into every block, on weights stacked once.
  stacked = stacked_blocks(cfg, params) if scan_layers(cfg, params) else None
  for li, edges in work:
    if not len(edges):
      continue
    n_up = E.n_upstream_of_mlp(cfg, li) if li < cfg.n_layers else E.n_senders(cfg)
    pad = (-len(edges)) % chunk
    idx = np.concatenate([edges, np.repeat(edges[-1:], pad)])
    for start in range(0, idx.size, chunk):
      sel = idx[start:start + chunk]
      s_sel, r_sel = jnp.asarray(s_idx[sel], jnp.int32), jnp.asarray(r_idx[sel], jnp.int32)
      if stacked is not None and li < cfg.n_layers:
        vals = edge_chunk_scan(cfg, task, params, stacked, run, jnp.asarray(li, jnp.int32),
                               resids, mlp_inputs, delta, s_sel, r_sel, clean_logits, positions,
                               kv_prefix)
      else:
        vals = edge_chunk(cfg, task, li, params, run, resids[li],
                          mlp_inputs[min(li, cfg.n_layers - 1)], delta[:, :, :n_up], s_sel, r_sel,
                          clean_logits, positions, kv_prefix)
      vals = np.asarray(vals, np.float64)
      keep = sel[:max(0, min(chunk, len(edges) - start))]
      out[s_idx[keep], r_idx[keep]] = vals[:len(keep)] - clean_total
      bar.update(1)
  bar.close()
  return out


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "layer"))
def node_chunk(cfg, task, layer, params, batch, resid, shifts, clean_logits, positions=None,
               kv_prefix=None):
  """Metric sums with one node of `layer` ablated at a time (every outgoing edge at once).

  Ablating a node s makes every receiver read x_r - (clean_s - ablated_s): the residual stream is
  shifted by (ablated_s - clean_s) where s writes (its own output is the clean one, since nothing
  upstream of it changes). Each copy (`vmap`) reruns the blocks from `layer` on, from the clean
  residual `resid` entering it, with `shifts[i]` ([3, batch, pos, d_model]) added at
  `blocks.{layer}.hook_resid_pre` (the input node), `hook_attn_out` (a head) and `hook_mlp_out`
  (an MLP). `clean_logits` are last-position logits (or None). `positions` and `kv_prefix`: as
  `edge_chunk`'s (the model's own heads here). Returns Float[Array, "chunk"].
  """
  start = LayerStart(layer, resid, positions=positions, kv_prefix=kv_prefix)
  p = f"blocks.{layer}."

  def one(sh):
    iv = {p + "hook_resid_pre": base.Shift(sh[0]), p + "hook_attn_out": base.Shift(sh[1]),
          p + "hook_mlp_out": base.Shift(sh[2])}
    _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask, interventions=iv,
                       start=start, collect=("ln_final.hook_normalized",))
    return task_metrics.metric_at_last(cfg, task, params, batch, cache["ln_final.hook_normalized"],
                               clean_logits)[0]

  return jax.vmap(one)(shifts)


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task"))
def node_chunk_scan(cfg, task, params, stacked, batch, layer, resids, shifts, clean_logits,
                    positions=None, kv_prefix=None):
  """`node_chunk` with the nodes' `layer` as data: one program for the nodes of every layer.

  The node's block (its weights picked by `layer` from `stacked_blocks`) runs from the clean
  residual `resids[layer]` with `shifts[i]` added at its `hook_resid_pre`, `hook_attn_out` and
  `hook_mlp_out`; the blocks after it run as one `lax.scan` (`_after`), as in `edge_chunk_scan`.
  The heads' k/v are ungrouped (`_own_kv`), which changes no value: each query head reads its own
  copy of its group's keys and values. Returns Float[Array, "chunk"].
  """
  cfg, params, kv_prefix = _own_kv(cfg, params, kv_prefix)
  blk = jax.tree.map(lambda a: a[layer], stacked)
  key_mask = batch.mask.astype(bool)
  pos = positions_of(key_mask) if positions is None else positions
  local = _layer_types(cfg)
  kv_at, local_at = jax.tree.map(lambda a: a[layer], (kv_prefix, local))
  resid = resids[layer]  # [batch, pos, d_model]

  def one(sh):
    iv = {"blocks.0.hook_resid_pre": base.Shift(sh[0]), "blocks.0.hook_attn_out": base.Shift(sh[1]),
          "blocks.0.hook_mlp_out": base.Shift(sh[2])}
    x = Block(cfg, 0).apply({"params": blk}, resid, pos, key_mask, Sites(iv), None, kv_at,
                            local_at)  # the node's block
    return _after(cfg, task, params, stacked, batch, layer, x, pos, key_mask, kv_prefix, local,
                  clean_logits)

  return jax.vmap(one)(shifts)


def _exact_nodes_batch(cfg, task, ablation, params, batch, clean_total, clean_logits, chunk,
                       quiet):
  """Sum over the batch of m(node ablated) - m(clean) for every node: Float64 [n_senders]."""
  if clean_logits is not None:
    clean_logits = jnp.take_along_axis(clean_logits, batch.last[:, None, None], axis=1)
  width, run, positions = suffix(cfg, batch, ablation)
  resids, _, delta, kv_prefix = upstream_cache(cfg, params, batch, ablation, width)
  if chunk is None:
    chunk = exact_chunk_size(cfg, *run.clean.shape)
  H = cfg.n_heads
  out = np.zeros(E.n_senders(cfg), np.float64)
  # One program for the nodes of every layer, on weights stacked once, in chunks of one shape.
  stacked = stacked_blocks(cfg, params) if scan_layers(cfg, params) else None
  for li in tqdm(range(cfg.n_layers), desc="exact: node layers", disable=quiet, leave=False):
    nodes = ([0] if li == 0 else []) + [E.head_sender(cfg, li, h) for h in range(H)]
    nodes.append(E.mlp_sender(cfg, li))
    slot = [0 if s == 0 else (2 if s == E.mlp_sender(cfg, li) else 1) for s in nodes]
    n_max = H + 2 if stacked is not None else len(nodes)  # layer 0 also has the input node
    size = -(-n_max // -(-n_max // chunk))  # balanced chunks of one shape
    pad = (-len(nodes)) % size
    nodes, slot = nodes + nodes[-1:] * pad, slot + slot[-1:] * pad
    for i in range(0, len(nodes), size):
      sel, where = np.asarray(nodes[i:i + size]), np.asarray(slot[i:i + size])
      onehot = jnp.asarray(where[:, None] == np.arange(3)[None, :], delta.dtype)  # [n, 3]
      shifts = -onehot[:, :, None, None, None] * jnp.moveaxis(delta[:, :, sel], 2, 0)[:, None]
      if stacked is not None:
        vals = node_chunk_scan(cfg, task, params, stacked, run, jnp.asarray(li, jnp.int32),
                               resids, shifts, clean_logits, positions, kv_prefix)
      else:
        vals = node_chunk(cfg, task, li, params, run, resids[li], shifts, clean_logits, positions,
                          kv_prefix)
      vals = np.asarray(vals, np.float64)
      out[sel] = vals - clean_total  # padding repeats the last node: the same value again
  return out


def score_batch(cfg, task, params, batch, ablation, options: ExactOptions) -> base.BatchScores:
  """Exact scores of one batch (the metric checked is the clean one: each rerun is one edge's)."""
  c_total, c_values, clean_logits = task_metrics.clean_metric(cfg, task, params, batch)
  if options.level == "node":
    s = _exact_nodes_batch(cfg, task, ablation, params, batch, float(c_total), clean_logits,
                           options.exact_chunk, not options.progress)
    return base.BatchScores(s, c_values, c_values, c_total)
  s = _exact_batch(cfg, task, ablation, params, batch, valid_edges(cfg), float(c_total),
                   clean_logits, options.exact_chunk, not options.progress)
  return base.BatchScores(s, c_values, c_values, c_total)


EXACT = base.Method(
    "exact", "activation patching of each edge in turn: the mean metric with that edge ablated "
    "minus the clean one (no approximation; --level=node: every outgoing edge of a node at once)",
    score_batch, ExactOptions, levels=("edge", "node", "position"), checkpoints_always=True)
