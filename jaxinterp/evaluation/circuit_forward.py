"""The circuit forward: a circuit's metric, computing only the nodes the circuit reads.

The graph-form forward (`models.edges`) runs every node and gives each head its own q/k/v input.
Evaluating a circuit needs much less. A receiver r reads

    x_r = A_r + sum_s w[s, r] * delta_s,        delta_s = live_s - ablated_s,

where A_r (the "ablated residual") is the sum of the ablated outputs of every sender upstream of r,
plus the constant biases. A_r does not depend on the circuit, so it is computed once per batch
(`prepare`). A node none of whose outgoing edges is in the circuit is never read live, so it is not
computed at all; the heads a layer does need are gathered into the smallest of a few static sizes
(`head_buckets`), chosen per circuit with `lax.switch`, so small circuits cost a fraction of a
forward; a layer whose receivers read few senders gathers just those rows of delta (`_read`). Only
each example's last position is unembedded. The all-ones circuit (the full model) is the plain
forward, and the empty circuit's metric comes with `prepare`. With patching, the positions that
clean and corrupted prompts share are not run again: every circuit runs only each row's suffix
from its first differing token, attending to the clean run's keys and values before it
(`shared_prefix`). The layers run as one `lax.scan` over the blocks' stacked weights (from a given
layer on, a loop: ACDC's trials), so the program does not grow with the depth. It agrees with the
graph-form reference (`evaluate_circuits(..., reference=True)`) to float32 rounding for every
supported config; `supported` names the exception (post-norms whose bias depends on the run).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.attribution.ablation import Ablation
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.sites import Sites
from jaxinterp.models.transformer import (
  MLP,
  Attention,
  KVPrefix,
  Norm,
  embed_inputs,
  forward,
  last_token_logits,
  positions_of,
  stack_blocks,
  ungroup_kv,
)
from jaxinterp.runtime import compile_policy, shared_prefix
from jaxinterp.tasks import Batch, Task
from jaxinterp.tasks.metrics import metric_at_last

Array = jax.Array


def supported(cfg: ModelConfig) -> bool:
  """Whether the circuit forward applies: everything except post-norms that are LayerNorms or carry
  an attention-output bias (there a head's share of the layer's output is not its sender value plus
  a run-independent constant). Gemma-2 (RMSNorm post-norms, no bias) is supported."""
  return not cfg.post_norms or (cfg.normalization == "rmsnorm" and not cfg.attn_out_bias)


def head_buckets(cfg: ModelConfig) -> tuple[int, ...]:
  """The static head counts a layer is computed with: 0, a quarter of the heads (from 8 heads on),
  or all of them (each is a compiled branch per layer: more sizes cost compile time for little run
  time).

  With post-norms a layer is all or nothing: the norm's scale depends on every head's output."""
  H = cfg.n_heads
  if cfg.post_norms:
    return (0, H)
  return tuple(sorted({0, H} | ({H // 4} if H // 4 >= 2 else set())))


@flax.struct.dataclass
class Prepared:
  """What every circuit of one batch shares. Its position axis ("pos") is each row's suffix when
  `prefix` is set, else the batch's.

  Attributes:
    ablated: Float[Array, "sender batch pos d_model"], the senders' ablated outputs in sender
      order (`models.edges`: the input node, then per layer its heads and its MLP).
    delta_input: Float[Array, "1 batch pos d_model"], the input node's live - ablated output.
    resid_attn: Float[Array, "layer batch pos d_model"], A_r of each layer's q/k/v receivers.
    resid_mlp: Float[Array, "layer batch pos d_model"], A_r of each layer's MLP receiver.
    resid_final: Float[Array, "batch pos d_model"], A_r of the logits receiver.
    clean_logits: Float[Array, "batch 1 vocab"], the clean model's logits at each last position.
    clean_total: Float[Array, ""], the clean model's metric summed over the batch's real rows.
    empty_total: Float[Array, ""], the same under the empty circuit (every edge ablated).
    positions: Int[Array, "batch pos"], the position ids of the computed positions.
    key_mask: Bool[Array, "batch pos"], which of them are real (and read).
    last: Int[Array, "batch"], each row's metric position among them.
    prefix: None, or the clean run's keys and values before each row's suffix (`KVPrefix` with a
      leading [layer] axis; heads ungrouped).
  """

  ablated: tuple
  delta_input: Array
  resid_attn: Array
  resid_mlp: Array
  resid_final: Array
  clean_logits: Array
  clean_total: Array
  empty_total: Array
  positions: Array
  key_mask: Array
  last: Array
  prefix: KVPrefix | None


def _groups(cfg: ModelConfig) -> list[tuple[int, int]]:
  """(first sender, count) of each sender group: input, then per layer heads and MLP."""
  out = [(0, 1)]
  for li in range(cfg.n_layers):
    out += [(E.head_sender(cfg, li, 0), cfg.n_heads), (E.mlp_sender(cfg, li), 1)]
  return out


def _patching_run(cfg: ModelConfig, params, batch: Batch,
                  sfx: shared_prefix.Suffix | None) -> tuple[tuple, Array, KVPrefix | None]:
  """The corrupted run's sender outputs grouped as `Prepared.ablated`, the clean run's final-norm
  output and (with a suffix) the clean prefix's keys and values. Without a suffix, one plain
  forward of the clean and corrupted rows together; with one, `shared_prefix.run_pair`. A head's
  output is its `hook_z` times its slice of W_O, so the graph form's per-head forward is not
  needed."""
  B, L = batch.clean.shape[0], cfg.n_layers
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)
  if sfx is None:
    names = (["ln_final.hook_normalized"] + [f"blocks.{li}.attn.hook_z" for li in range(L)] +
             [f"blocks.{li}.hook_mlp_out" for li in range(L)])
    _, cache = forward(cfg, params, jnp.concatenate([batch.clean, batch.corrupted]),
                       attention_mask=jnp.concatenate([batch.mask, batch.mask]), collect=names)
    x, prefix = cache["ln_final.hook_normalized"][:B], None
    zs = [cache[f"blocks.{li}.attn.hook_z"][B:] for li in range(L)]
    mlps = [cache[f"blocks.{li}.hook_mlp_out"][B:] for li in range(L)]
  else:  # the clean batch, then the corrupted suffixes after its prefix
    final, _, ys, prefix = shared_prefix.run_pair(
        cfg, params, embed_inputs(cfg, params, batch.clean, batch.mask), e_corrupt, batch.mask,
        sfx, corrupt_collect=("attn.hook_z", "hook_mlp_out"))
    x, e_corrupt = norm(cfg, params.get("ln_final"), final), sfx.take(e_corrupt)
    zs, mlps = ys["attn.hook_z"], ys["hook_mlp_out"]
  groups = [e_corrupt[None].astype(x.dtype)]
  for li in range(L):
    blk = params[f"blocks_{li}"]
    z = zs[li]  # [batch, pos, head, d_head]
    heads = jnp.einsum("bphe,hed->hbpd", z, blk["attn"]["W_O"])
    if cfg.post_norms:  # as the graph form: the layer's post-norm scale, shared by its heads
      b_O = blk["attn"]["b_O"] if cfg.attn_out_bias else 0.0
      heads = heads * norm(cfg, blk["ln1_post"], heads.sum(0) + b_O, Norm.scale)[None]
    groups += [heads.astype(x.dtype), mlps[li][None].astype(x.dtype)]
  return tuple(groups), x, prefix


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "suffix"))
def prepare(cfg: ModelConfig, task: Task, params, batch: Batch, ablation: Ablation,
            suffix: int | None = None) -> Prepared:
  """The per-batch arrays every circuit reuses: ablated senders, A_r, the clean run's metric.

  With patching, one plain forward of the clean and corrupted rows gives both runs, or, with a
  `suffix` width (`shared_prefix.plan`), the clean run of the batch and the corrupted run of each
  row's suffix; the other ablations take their sender values from `Ablation.values`."""
  sfx = None if suffix is None else shared_prefix.Suffix.of(batch, suffix)
  prefix = None
  if ablation.kind == "patching":
    ablated, x, prefix = _patching_run(cfg, params, batch, sfx)
  else:
    values = ablation.values(cfg, params, batch)  # [batch, pos, sender, d_model]
    ablated = tuple(jnp.moveaxis(values[:, :, s0:s0 + n], 2, 0) for s0, n in _groups(cfg))
    _, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                       collect=("ln_final.hook_normalized",))
    x = cache["ln_final.hook_normalized"]
  live_input = embed_inputs(cfg, params, batch.clean, batch.mask)
  clean_logits = last_token_logits(cfg, params, x, batch.last)
  total, _ = metric_at_last(cfg, task, params, batch, x, clean_logits)
  if sfx is not None:  # from here on, only each row's suffix
    live_input, batch = sfx.take(live_input), sfx.batch(batch)
  sums = [g.sum(0) for g in ablated]  # per group
  b_O = [params[f"blocks_{li}"]["attn"]["b_O"] if cfg.attn_out_bias else 0.0
         for li in range(cfg.n_layers)]
  attn, mlp, acc = [], [], sums[0]
  for li in range(cfg.n_layers):
    attn.append(acc)
    heads = sums[1 + 2 * li] + b_O[li]
    mlp.append(acc if cfg.parallel_attn_mlp else acc + heads)
    acc = acc + heads + sums[2 + 2 * li]
  empty, _ = metric_at_last(cfg, task, params, batch, norm(cfg, params.get("ln_final"), acc),
                            clean_logits)
  positions = positions_of(batch.mask) if sfx is None else sfx.positions
  return Prepared(jnp.concatenate(ablated), live_input[None] - ablated[0], jnp.stack(attn),
                  jnp.stack(mlp), acc, clean_logits, total, empty, positions,
                  batch.mask.astype(bool), batch.last, prefix)


def norm(cfg: ModelConfig, p, x: Array, method=None) -> Array:
  """The config's norm with weights `p` (None: an identity norm's empty weights) applied to x."""
  return Norm(cfg).apply({"params": p or {}}, x, method=method)


SPARSE_ROWS = 16  # a layer whose receivers read at most this many senders gathers just those
READ_BUCKETS = 6  # the dense read of a layer's upstream senders is one of this many + 1 row counts


def read_buckets(cfg: ModelConfig) -> tuple[int, ...]:
  """The sender-row counts a layer's dense read runs over (a compiled branch each, at most
  READ_BUCKETS + 1 however deep the model): upstream senders of some layers, the last layer's
  last. A layer reads the smallest that covers its own (from 8 layers on, up to (n_layers - 1) /
  READ_BUCKETS layers' rows more, weighted 0; shallower models read exactly their own)."""
  L, H = cfg.n_layers, cfg.n_heads
  return tuple(sorted({1 + -(-j * (L - 1) // READ_BUCKETS) * (H + 1)
                       for j in range(READ_BUCKETS + 1)}))


def _read(delta: Array, coef: Array, n_up: int | Array, buckets: tuple[int, ...] = ()) -> Array:
  """sum_s coef[s, r] delta_s over the first n_up senders: [r, batch, pos, d].

  `coef`: Float[Array, "sender r"], the receivers' weights (rows from n_up on unread). `n_up` is
  static, or traced (the scan over layers) with `buckets` (`read_buckets`): the dense product then
  runs over the smallest bucket of rows covering n_up, the rows past it weighted 0. When few
  senders are read (small circuits), only their rows of delta are gathered: the dense product
  would stream every upstream sender's [batch, pos, d_model] for a handful of nonzeros."""
  S = delta.shape[0]
  if isinstance(n_up, int):
    coef, buckets = coef[:n_up], (n_up,)
  else:
    coef = jnp.where((jnp.arange(S) < n_up)[:, None], coef, 0.0)
  coef = coef.astype(delta.dtype)

  def dense():
    branches = [lambda n=n: jnp.einsum("sbpd,sk->kbpd", delta[:n], coef[:n]) for n in buckets]
    if len(branches) == 1:
      return branches[0]()
    return jax.lax.switch(jnp.searchsorted(jnp.asarray(buckets), n_up), branches)

  if buckets[-1] <= 2 * SPARSE_ROWS:  # never more than 2 * SPARSE_ROWS rows: always dense
    return dense()
  read = jnp.any(coef != 0, axis=1)
  rows = jnp.argsort(jnp.where(read, 0, 1), stable=True)[:SPARSE_ROWS]  # the read senders first

  def sparse():
    return jnp.einsum("sbpd,sk->kbpd", delta[rows], jnp.where(read[rows][:, None], coef[rows], 0.0))

  return jax.lax.cond((n_up > 2 * SPARSE_ROWS) & (read.sum() <= SPARSE_ROWS), sparse, dense)


@flax.struct.dataclass
class Layer:
  """One layer's slice of the scan over layers (`circuit_metric`): its index, block weights (a slice
  of `stack_blocks`), A_r of its q/k/v and MLP receivers, its clean key/value prefix (or None) and
  whether it is a sliding-window layer (or None: no sliding layers)."""

  li: Array
  blk: dict
  resid_attn: Array
  resid_mlp: Array
  prefix: KVPrefix | None
  local: Array | None


def layers(cfg: ModelConfig, stacked, prep: Prepared) -> Layer:
  """The scan's per-layer slices (`Layer`; the layers' types as data, None if none slides)."""
  local = jnp.asarray([li in cfg.sliding_layers for li in range(cfg.n_layers)])
  return Layer(jnp.arange(cfg.n_layers), stacked, prep.resid_attn, prep.resid_mlp, prep.prefix,
               local if cfg.sliding_layers else None)


def heads_delta(cfg: ModelConfig, K: int, lay: Layer, prep: Prepared, read: Array, needed: Array,
                s0: Array) -> Array:
  """A layer's heads' live - ablated outputs, [n_heads, batch, pos, d_model], computing (up to) K
  of the needed heads (the others are left zero: nothing reads them). `read` is `_read` of the
  layer's q, k, v receivers (and its MLP's, unused here); `s0` the layer's first head sender."""
  H, blk = cfg.n_heads, lay.blk
  if K == 0:
    return jnp.zeros((H,) + prep.ablated.shape[1:], prep.ablated.dtype)
  if K == H:  # every head, in place: no gathers
    idx, x, gathered = slice(None), read[:3 * H], blk["attn"]
  else:
    idx = jnp.argsort(jnp.where(needed, 0, 1), stable=True)[:K]  # the needed heads first
    x = read[jnp.concatenate([idx, H + idx, 2 * H + idx])]
    gathered = {k: (v[idx] if k != "b_O" else v) for k, v in blk["attn"].items()}
  x = norm(cfg, blk.get("ln1"), lay.resid_attn + x)  # [3K, batch, pos, d_model]
  # Head-major throughout: each head's input is projected where it lies (no transposes of the
  # [K, batch, pos, d_model] inputs), and each head's output comes out as its sender row.
  q, k, v = (jnp.einsum("hbpd,hde->bphe", x[i * K:(i + 1) * K], gathered[f"W_{n}"]) +
             gathered.get(f"b_{n}", 0.0) for i, n in enumerate("QKV"))
  prefix = None
  if lay.prefix is not None:  # this layer's clean keys and values before the suffix, K heads
    pk, pv = lay.prefix.k[:, :, idx], lay.prefix.v[:, :, idx]
    prefix = KVPrefix(pk, pv, lay.prefix.positions, lay.prefix.mask)
  z = Attention(dataclasses.replace(cfg, n_heads=K, n_kv_heads=None), 0).apply(
      {"params": gathered}, q, k, v, positions=prep.positions, key_mask=prep.key_mask,
      sites=Sites(), prefix=prefix, local=lay.local, method=Attention.attend)
  result = jnp.einsum("bphe,hed->hbpd", z, gathered["W_O"])  # [K, batch, pos, d_model]
  if cfg.post_norms:  # K == H: the norm's scale is that of the whole layer's output
    result = result * norm(cfg, blk["ln1_post"], result.sum(0), Norm.scale)[None]
  ablated = jax.lax.dynamic_slice_in_dim(prep.ablated, s0, H)  # sliced where used: fused, no copy
  new = result.astype(ablated.dtype) - ablated[idx]
  new = jnp.where(needed[idx][:, None, None, None], new, 0.0)
  return new if K == H else jnp.zeros_like(ablated).at[idx].set(new)


def mlp_delta(cfg: ModelConfig, lay: Layer, coef_heads: Array, heads: Array, read: Array,
              prep: Prepared, s: Array) -> Array:
  """A layer's MLP's live - ablated output, [1, batch, pos, d_model]. `read` covers the senders
  before the layer; the layer's own `heads` (upstream unless the blocks are parallel, read with
  weights `coef_heads`, [n_heads] or per row [n_heads, batch]) are added. `s`: the MLP's sender."""
  blk = lay.blk
  x = lay.resid_mlp + read[3 * cfg.n_heads]
  if not cfg.parallel_attn_mlp:
    c = coef_heads.astype(heads.dtype)
    x = x + jnp.sum(heads * c.reshape(c.shape + (1,) * (heads.ndim - c.ndim)), 0)
  out = MLP(cfg, 0).apply({"params": blk["mlp"]}, norm(cfg, blk.get("ln2"), x), Sites())
  if cfg.post_norms:
    out = norm(cfg, blk["ln2_post"], out)
  return out[None].astype(prep.ablated.dtype) - jax.lax.dynamic_slice_in_dim(prep.ablated, s, 1)


def scratch_like(cfg: ModelConfig, prep: Prepared) -> Array:
  """`circuit_metric`'s sender-difference buffer: Float[Array, "sender batch pos d_model"]."""
  return jnp.zeros((E.n_senders(cfg),) + prep.delta_input.shape[1:], prep.delta_input.dtype)


_stack = jax.jit(stack_blocks, static_argnums=0)


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task"),
                   donate_argnames=("scratch",))
def circuit_metric(cfg: ModelConfig, task: Task, params, batch: Batch, prep: Prepared,
                   w: Array, scratch: Array, stacked=None, start=None) -> tuple[Array, Array]:
  """The metric summed over the batch's real rows under one circuit.

  The layers run as one `lax.scan` (weights, A_r, key/value prefix and sliding-window type are
  scanned, sender and receiver indices are data): the program's size does not grow with depth.

  Args:
    cfg, params: the model with key/value heads ungrouped (`ungroup_kv`).
    w: Float[Array, "sender receiver"], the circuit's edge weights, zero on invalid edges.
    scratch: `scratch_like(cfg, prep)` or the previous call's returned buffer (donated; its
      contents only need to be finite: a read may cover rows of later layers, weighted 0). Reusing
      it spares each call allocating, and the memory system faulting in, a [sender, batch, pos,
      d_model] buffer.
    stacked: `stack_blocks(cfg, params)`, made once for many calls (`CircuitForward` does); None
      stacks the blocks' weights in the call (a copy of them per call).
    start: None, or Int[Array, ""]: the layers before it are not run, and `scratch` must hold the
      live - ablated rows of the senders before it (every edge into them in the circuit: ACDC).

  Returns:
    (Float[Array, ""], the buffer to pass to the next call).
  """
  H = cfg.n_heads
  buckets, rows = head_buckets(cfg), read_buckets(cfg)
  shape = prep.delta_input.shape[1:]
  stacked = stack_blocks(cfg, params) if stacked is None else stacked

  def layer(delta, lay: Layer):
    # live - ablated of every sender, [sender, batch, pos, d_model]. Each layer writes all its rows
    # (zero for senders nothing reads); later layers' rows that a read covers are weighted 0.
    s0 = 1 + lay.li * (H + 1)  # the layer's first head sender = its number of upstream senders
    w_heads = jax.lax.dynamic_slice_in_dim(w, s0, H + 1)  # [H + 1, receiver]: heads, then MLP
    needed = jnp.any(w_heads[:H] != 0, axis=1)  # heads some in-circuit edge reads
    mlp_needed = jnp.any(w_heads[H] != 0)
    # One pass over the upstream senders for the layer's q, k, v and MLP receivers (contiguous).
    coef = jax.lax.dynamic_slice_in_dim(w, lay.li * (3 * H + 1), 3 * H + 1, 1)  # [sender, 3H+1]
    read = jax.lax.cond(needed.any() | mlp_needed,
                        lambda d: _read(d, coef, s0, rows),
                        lambda d: jnp.zeros((3 * H + 1,) + shape, d.dtype), delta)
    heads = jax.lax.switch(jnp.searchsorted(jnp.asarray(buckets), needed.sum()),
                           [functools.partial(heads_delta, cfg, K, lay, prep) for K in buckets],
                           read, needed, s0)
    delta = jax.lax.dynamic_update_slice_in_dim(delta, heads, s0, 0)
    mlp = jax.lax.cond(mlp_needed,
                       lambda h, r: mlp_delta(cfg, lay, jax.lax.dynamic_slice_in_dim(
                           coef[:, 3 * H], s0, H), h, r, prep, s0 + H),
                       lambda h, r: jnp.zeros((1,) + shape, h.dtype), heads, read)
    return jax.lax.dynamic_update_slice_in_dim(delta, mlp, s0 + H, 0), None

  delta = scratch.at[0].set(prep.delta_input[0])
  xs = layers(cfg, stacked, prep)
  if start is None:
    delta, _ = jax.lax.scan(layer, delta, xs)
  else:  # layers start.. only (a loop of traced length), the rows before them as given
    delta = jax.lax.fori_loop(start, cfg.n_layers, lambda li, d: layer(
        d, jax.tree.map(lambda a: a[li], xs))[0], delta)
  col = jnp.asarray([E.logits_receiver(cfg)])
  x = prep.resid_final + _read(delta, w[:, col], E.n_senders(cfg))[0]
  total, _ = metric_at_last(cfg, task, params, batch.replace(last=prep.last),
                            norm(cfg, params.get("ln_final"), x), prep.clean_logits)
  return total, delta


class CircuitForward:
  """Evaluate many circuits on one model: `prepare` once per batch, then `metric` per circuit.

  Circuits are run one after another (each skips different nodes, which `vmap` cannot); every call
  is asynchronous, so the host queues the next circuit while the device runs the last."""

  def __init__(self, cfg: ModelConfig, params, task: Task, valid: np.ndarray):
    self.cfg, self.params, self.task = *ungroup_kv(cfg, params), task  # GQA ungrouped
    self.valid = np.asarray(valid, bool)
    self._scratch: dict[tuple, Array] = {}  # circuit_metric's buffer per batch shape, reused
    self._stacked = None  # stack_blocks(cfg, params), made on first use

  @property
  def stacked(self):
    """The blocks' weights on a leading layer axis for the scan over layers, made once."""
    if self._stacked is None:
      self._stacked = _stack(self.cfg, self.params)
    return self._stacked

  def is_full(self, w: np.ndarray) -> bool:
    """Whether `w` keeps every valid edge live (the plain model)."""
    return bool(np.all(w[self.valid] == 1))

  def prepare(self, batch: Batch, ablation: Ablation) -> Prepared:
    """What every circuit of `batch` shares (module-level `prepare`; with patching, only the rows'
    suffixes after their shared prefix are run per circuit, `shared_prefix.plan`)."""
    return prepare(self.cfg, self.task, self.params, batch, ablation,
                   shared_prefix.plan(self.cfg, batch, ablation.kind))

  def compile(self, batches: Iterable[Batch], ablation: Ablation) -> None:
    """Compile `prepare` and the circuit metric for the shape of every batch, running nothing.

    Run from a thread while something else computes (as `find_circuit` does during attribution),
    this takes the compiles off the critical path: later calls with these shapes find them compiled.
    """
    seen = set()
    for batch in batches:
      suffix = shared_prefix.plan(self.cfg, batch, ablation.kind)
      if (batch.clean.shape, suffix) in seen:
        continue
      seen.add((batch.clean.shape, suffix))
      args = (self.cfg, self.task, self.params, batch, ablation)
      prepare.lower(*args, suffix).compile()
      prep = jax.eval_shape(
          lambda p, b, a, suffix=suffix: prepare(self.cfg, self.task, p, b, a, suffix), *args[2:])
      w, scratch = (jax.ShapeDtypeStruct(self.valid.shape, jnp.float32),
                    jax.eval_shape(lambda prep=prep: scratch_like(self.cfg, prep)))
      stacked = jax.eval_shape(lambda p: stack_blocks(self.cfg, p), self.params)
      circuit_metric.lower(self.cfg, self.task, self.params, batch, prep, w, scratch,
                           stacked).compile()

  def metric(self, batch: Batch, prep: Prepared, w: np.ndarray) -> Array:
    """Metric sum over the batch for circuit `w` (Float [sender, receiver]); a device scalar."""
    if self.is_full(w):
      return prep.clean_total
    w = np.where(self.valid, w, 0).astype(np.float32)
    if not w.any():  # the empty circuit: every receiver reads its ablated residual
      return prep.empty_total
    shape = prep.delta_input.shape
    scratch = self._scratch.pop(shape, None)
    if scratch is None:
      scratch = scratch_like(self.cfg, prep)
    total, self._scratch[shape] = circuit_metric(
        self.cfg, self.task, self.params, batch, prep, jnp.asarray(w), scratch, self.stacked)
    return total
