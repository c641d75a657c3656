"""attribution_graph's kernels as `runtime.memory_plan` builders (`batch size -> (fn, abstract
args)`), for `--dry_run`: one batch of attribution-graph rows, the linearised replacement run and
the vmapped VJPs (`transcoders.attribution`), for an assumed number of active features; and the
host bytes of the dense rows and the adjacency.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.transcoders import attribution as TA
from jaxinterp.transcoders import replacement
from jaxinterp.transcoders.plt import PerLayerTranscoders

# Active features per layer and token assumed (the graph's width depends on the prompt;
# circuit-tracer's Gemma-2-2B transcoders keep some tens active per token and layer).
ACTIVE_PER_TOKEN_LAYER = 64


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def transcoders(cfg: ModelConfig, n_features: int, dtype) -> PerLayerTranscoders:
  """Abstract per-layer ReLU transcoders of `n_features` features at every layer's MLP."""
  L, d, F = cfg.n_layers, cfg.d_model, n_features
  return PerLayerTranscoders(_spec((L, d, F), dtype), _spec((L, F), dtype), _spec((L, F, d), dtype),
                             _spec((L, d), dtype))


def n_active(cfg: ModelConfig, seq_len: int) -> int:
  """Active features assumed for a prompt of `seq_len` tokens (BOS has none)."""
  return cfg.n_layers * (seq_len - 1) * ACTIVE_PER_TOKEN_LAYER


def graph(cfg: ModelConfig, params, seq_len: int, n_features: int, dtype) -> MP.Builder:
  """One batch of attribution-graph rows (`b` target rows per batch of VJPs)."""
  tc = transcoders(cfg, n_features, dtype)
  L, P, d, A = cfg.n_layers, seq_len, cfg.d_model, n_active(cfg, seq_len)

  def build(b):
    def fn(params, tc, tokens, writers, layers, positions, vectors):
      like, _, vjp = replacement.linearize(cfg, params, tc, tokens)
      return TA._rows(vjp, like, writers, layers, positions, vectors)

    i32 = jnp.int32
    # The decoder entries grouped by (layer, position) cell, as `attribute_graph` runs `_rows`:
    # ACTIVE_PER_TOKEN_LAYER entries in each of the L * (P - 1) cells, in chunks of G.
    counts = np.full(L * (P - 1), ACTIVE_PER_TOKEN_LAYER)
    G = TA.chunk_size(counts)
    C = int(np.maximum(-(-counts // G), 1).sum())
    chunks = TA.CellChunks(_spec((C,), i32), _spec((C, G, d), dtype), _spec((A,), i32), True)
    writers = TA.Writers(_spec((A,), i32), _spec((A,), i32), _spec((A,), i32),
                         _spec((A, d), dtype), _spec((L, P, d), dtype), _spec((P, d), dtype), A,
                         chunks)
    return fn, (params, tc, _spec((P,), i32), writers, _spec((b,), i32), _spec((b,), i32),
                _spec((b, d), jnp.float32))
  return build


def graph_host_bytes(cfg: ModelConfig, seq_len: int, max_feature_nodes: int | None,
                     n_logits: int) -> int:
  """Host bytes of the dense float32 rows `attribute_graph` fills ([rows, columns]) and of the
  square adjacency it returns."""
  A = n_active(cfg, seq_len)
  feats = A if max_feature_nodes is None else min(A, max_feature_nodes)
  cols = A + (cfg.n_layers + 1) * seq_len + n_logits
  n = feats + (cfg.n_layers + 1) * seq_len + n_logits
  return 4 * ((feats + n_logits) * cols + n * n)
