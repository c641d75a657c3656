"""The mask-training methods' forward: the circuit forward under continuous edge weights,
differentiable in them, as one scan over the layers.

UGS and Edge Pruning train a weight w[s, r] in [0, 1] per edge (one for the batch, or one per row
for per-row mask samples). As in the circuit forward (`evaluation.circuit_forward`), receiver r
reads

    x_r = A_r + sum_s w[s, r] * delta_s,        delta_s = live_s - ablated_s,

with A_r (the ablated senders' sum), the ablated senders and the clean logits computed once per
batch without gradient (`prepare`), and the layers run as one `lax.scan` over the blocks' stacked
weights: the program does not grow with depth (the graph-form forward, `models.EdgePatch`, unrolls
its layers). Unlike the circuit forward every node is computed: a continuous weight reads every
sender. The result is the graph form's x_r = resid_r - sum_s (1 - w[s, r]) delta_s, to float32
rounding (the sums are taken in another order); `masks.circuit_loss` runs the graph form instead
for the configs the circuit forward does not support (`circuit_forward.supported`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinterp.attribution.ablation import Ablation
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import last_token_logits, stack_blocks, ungroup_kv
from jaxinterp.tasks import Batch, Task

Array = jax.Array

SMALL_DEPTH = 4  # models up to this deep run each layer with its own read (as the graph form)
GROUPS = 2  # deeper models: this many scans over contiguous layers
# Prepared's fields with a batch axis, and where it is (the others are per-batch scalars or None).
_BATCH_AXIS = {"ablated": 1, "delta_input": 1, "resid_attn": 1, "resid_mlp": 1, "resid_final": 0,
               "clean_logits": 0, "positions": 0, "key_mask": 0, "last": 0}


def prepare(cfg: ModelConfig, task: Task, params, batch: Batch, ablation: Ablation
            ) -> CF.Prepared:
  """What every mask of `batch` shares (`circuit_forward.prepare` over every position, key/value
  heads ungrouped), as constants: no gradient flows into the model's runs."""
  cfg, params = ungroup_kv(cfg, params)
  return jax.lax.stop_gradient(CF.prepare(cfg, task, params, batch, ablation))


def repeat(prep: CF.Prepared, n: int) -> CF.Prepared:
  """`prep` of the batch repeated n times along its rows (sample-major: row j * batch + b is row
  b), for n mask samples per example."""
  tiled = {k: jnp.concatenate([getattr(prep, k)] * n, axis) for k, axis in _BATCH_AXIS.items()}
  return prep.replace(**tiled)


def _read(delta: Array, coef: Array, n_up, n: int) -> Array:
  """sum_s coef[s, r] delta_s over the first n_up senders (traced), reading the first n rows of
  delta (static, n >= n_up; the rows from n_up on weighted 0): [r, batch, pos, d_model].

  `coef`: Float[Array, "sender r"] (one mask) or Float[Array, "batch sender r"] (a mask per row).
  """
  coef = jnp.where((jnp.arange(n) < n_up)[:, None], coef[..., :n, :], 0.0).astype(delta.dtype)
  return jnp.einsum("sbpd,sk->kbpd" if coef.ndim == 2 else "sbpd,bsk->kbpd", delta[:n], coef)


def layer_groups(n_layers: int) -> list[tuple[int, int]]:
  """The [first, end) layer ranges scanned one after another, each reading a static number of
  senders (those upstream of its last layer): every layer alone up to SMALL_DEPTH layers, else
  GROUPS contiguous groups. More groups read fewer senders that are weighted 0 (the reads are a
  quarter of a layer's work on GPT-2 small) but compile a scan body each."""
  if n_layers <= SMALL_DEPTH:
    return [(li, li + 1) for li in range(n_layers)]
  cuts = [round(j * n_layers / GROUPS) for j in range(GROUPS + 1)]
  return list(zip(cuts[:-1], cuts[1:], strict=True))


def last_logits(cfg: ModelConfig, params, prep: CF.Prepared, w: Array) -> Array:
  """Logits at each row's last real position under the edge weights w: Float[Array, "batch 1
  vocab"].

  w: Float[Array, "sender receiver"] or Float[Array, "batch sender receiver"], differentiable;
  invalid edges are read as 0 whatever w holds there.
  """
  cfg, params = ungroup_kv(cfg, params)
  H = cfg.n_heads
  w = jnp.where(jnp.asarray(valid_edges(cfg)), w, 0.0)
  everyone = jnp.ones((H,), bool)

  def layer(n, delta, lay: CF.Layer):
    s0 = 1 + lay.li * (H + 1)  # the layer's first head sender = its number of upstream senders
    coef = jax.lax.dynamic_slice_in_dim(w, lay.li * (3 * H + 1), 3 * H + 1, w.ndim - 1)
    read = _read(delta, coef, s0, n)  # the layer's q, k, v and MLP receivers
    heads = CF.heads_delta(cfg, H, lay, prep, read, everyone, s0)
    delta = jax.lax.dynamic_update_slice_in_dim(delta, heads, s0, 0)
    coef_heads = jax.lax.dynamic_slice_in_dim(coef[..., 3 * H], s0, H, w.ndim - 2)
    mlp = CF.mlp_delta(cfg, lay, coef_heads.T, heads, read, prep, s0 + H)
    return jax.lax.dynamic_update_slice_in_dim(delta, mlp, s0 + H, 0), None

  shape = prep.delta_input.shape[1:]
  delta = jnp.zeros((E.n_senders(cfg),) + shape, prep.delta_input.dtype)
  delta = delta.at[0].set(prep.delta_input[0])
  xs = CF.layers(cfg, stack_blocks(cfg, params), prep)
  for first, end in layer_groups(cfg.n_layers):  # each reads the senders before its last layer
    n = 1 + (end - 1) * (H + 1)
    delta, _ = jax.lax.scan(functools.partial(layer, n), delta,
                            jax.tree.map(lambda a, first=first, end=end: a[first:end], xs))
  coef = w[..., E.logits_receiver(cfg)].astype(delta.dtype)  # [(batch,) sender]
  x = prep.resid_final + jnp.einsum("sbpd,s->bpd" if coef.ndim == 1 else "sbpd,bs->bpd", delta,
                                    coef)
  return last_token_logits(cfg, params, CF.norm(cfg, params.get("ln_final"), x), prep.last)
