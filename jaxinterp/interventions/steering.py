"""Steering vectors from contrast pairs, and cross-model activation patching.

* `mean_difference`: mean activation on "positive" prompts minus mean on "negative" prompts at a
  site (at each example's chosen position), the classic contrastive steering vector; `steer` wraps
  it in an `Add` intervention.
* `cross_model_patch`: collect activations from model A and patch them into model B of the same
  architecture (e.g. a base model and its fine-tune) at chosen sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions.basic import ALL, Add, InterventionError, Patch, Where
from jaxinterp.models import forward

Array = jax.Array


def _at_positions(act: Array, positions) -> Array:
  """act [batch, pos, ...] at one position per example -> [batch, ...]."""
  b = act.shape[0]
  pos = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b,))
  pos = jnp.where(pos < 0, pos + act.shape[1], pos)
  return act[jnp.arange(b), pos]


def mean_difference(cfg, params: Mapping[str, Any], positive: Array, negative: Array, site: str, *,
                    positive_pos: int | Array = -1, negative_pos: int | Array = -1,
                    positive_mask: Array | None = None,
                    negative_mask: Array | None = None) -> Array:
  """Mean-difference steering vector at `site` from contrast prompts.

  Args:
    positive, negative: Int[Array, "batch pos"] prompts (the two batches may differ in size).
    positive_pos, negative_pos: position read in each example (int, or Int[Array, "batch"], e.g.
      the last real token under right padding).

  Returns:
    Float[Array, "..."]: the site's trailing shape (`[d_model]` for residual sites,
    `[head, d_head]` for per-head sites).
  """
  _, cp = forward(cfg, params, positive, attention_mask=positive_mask, collect=(site,))
  _, cn = forward(cfg, params, negative, attention_mask=negative_mask, collect=(site,))
  return (_at_positions(cp[site], positive_pos).mean(0)
          - _at_positions(cn[site], negative_pos).mean(0))


def steer(vector: Array, scale: float = 1.0, positions=None, heads=None) -> Add:
  """An `Add` intervention x + scale * vector at the given positions (None = all)."""
  return Add(jnp.asarray(vector), jnp.asarray(scale, jnp.float32), Where.of(positions, heads))


def same_architecture(params_a: Mapping[str, Any], params_b: Mapping[str, Any]) -> None:
  """Raise InterventionError unless two param trees have identical structure and shapes."""
  fa, ta = jax.tree_util.tree_flatten_with_path(params_a)
  fb, tb = jax.tree_util.tree_flatten_with_path(params_b)
  if ta != tb:
    raise InterventionError("cross-model patching needs models of the same architecture: the param "
                            "trees differ in structure")
  for (pa, a), (_, b) in zip(fa, fb, strict=True):
    if np.shape(a) != np.shape(b):
      raise InterventionError("cross-model patching needs the same architecture: "
                              f"{jax.tree_util.keystr(pa)} has shape {np.shape(a)} "
                              f"vs {np.shape(b)}")


def cross_model_patch(cfg, params_from: Mapping[str, Any], params_into: Mapping[str, Any],
                      tokens_from: Array, tokens_into: Array, sites: str | Sequence[str], *,
                      where=ALL, mask_from: Array | None = None, mask_into: Array | None = None,
                      collect: Sequence[str] = ()):
  """Run model A (`params_from`) on `tokens_from`, patch its activations at `sites` into model B
  (`params_into`, same architecture) running on `tokens_into`.

  Returns:
    B's logits Float[Array, "batch pos vocab"] (and a cache if `collect` is given).
  """
  same_architecture(params_from, params_into)
  sites = [sites] if isinstance(sites, str) else list(sites)
  _, acts = forward(cfg, params_from, tokens_from, attention_mask=mask_from, collect=tuple(sites))
  ivs = {s: Patch(acts[s], where) for s in sites}
  return forward(cfg, params_into, tokens_into, attention_mask=mask_into, interventions=ivs,
                 collect=tuple(collect))
