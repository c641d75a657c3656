"""Subspace-illusion diagnostic (Makelov et al., "Is This the Subspace You Are Looking For?").

A direction v found by subspace patching at a site can work through a *dormant pathway*: its
component in the null space of the downstream weights does nothing by itself, yet patching along v
(row-space + null-space parts together) activates a causal effect that the row-space part alone
would not have. The check: split v = v_row + v_null, where v_row lies in the row space of the
weights W that read the site (for a site x read as x @ W, W: [d_site, d_out], that is the column
space of W) and v_null in their null space (v_null @ W = 0), then compare the patching effect of v
with the effect of patching along v_row alone (and along v_null alone).

Downstream weights of common sites: `blocks.{l}.mlp.hook_post` -> `W_out` of layer l;
`blocks.{l}.attn.hook_z` (head h) -> `W_O[h]`. Residual-stream sites are read by every later layer,
so they have no single downstream matrix; pass `W` explicitly there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxinterp.interventions.basic import ALL, InterventionError
from jaxinterp.interventions.das import LowRankRotatedSpace
from jaxinterp.interventions.runner import collect_sources
from jaxinterp.models import forward

Array = jax.Array


def downstream_weights(cfg, params: Mapping[str, Any], site: str, head: int | None = None) -> Array:
  """The matrix that reads a site: Float[Array, "d_site d_out"] (the site's activation times it).

  Supported: `blocks.{l}.mlp.hook_post` (W_out) and `blocks.{l}.attn.hook_z` with `head`
  (W_O[head]).
  """
  parts = site.split(".")
  try:
    layer = int(parts[1])
    block = params[f"blocks_{layer}"]
  except (IndexError, ValueError, KeyError):
    raise InterventionError(f"no downstream weights known for site {site!r}; "
                            "pass W explicitly") from None
  if site.endswith("mlp.hook_post"):
    return block["mlp"]["W_out"]
  if site.endswith("attn.hook_z"):
    if head is None:
      raise InterventionError(f"{site!r} is per-head: pass head= to get W_O[head]")
    return block["attn"]["W_O"][head]
  raise InterventionError(f"no downstream weights known for site {site!r}; pass W explicitly")


def split_row_null(v: Array, W: Array, rtol: float = 1e-6) -> tuple[Array, Array]:
  """Split v (Float[Array, "d_site"]) into (v_row, v_null) for a site read as x @ W.

  v_row is the orthogonal projection of v onto the column space of W (the row space of the linear
  map y = W^T x in column-vector convention); v_null = v - v_row satisfies v_null @ W ~ 0.
  """
  W = jnp.asarray(W, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  if W.ndim != 2 or v.shape != (W.shape[0],):
    raise InterventionError(f"split_row_null: v of shape {v.shape} does not match W of shape "
                            f"{W.shape}")
  U, S, _ = jnp.linalg.svd(W, full_matrices=False)
  keep = S > rtol * jnp.max(S)
  Ur = U * keep[None, :]
  v_row = Ur @ (Ur.T @ v)
  return v_row, v - v_row


def _effect(cfg, params, base, src_act, site, direction, where, metric, base_mask):
  n = jnp.linalg.norm(direction)
  basis = (direction / jnp.where(n > 0, n, 1.0))[:, None]
  iv = LowRankRotatedSpace(basis, source=src_act, where=where)
  logits = forward(cfg, params, base, attention_mask=base_mask, interventions={site: iv})
  return jnp.where(n > 0, metric(logits),
                   metric(forward(cfg, params, base, attention_mask=base_mask)))


def illusion_report(cfg, params: Mapping[str, Any], site: str, v: Array, base: Array, source: Array,
                    metric: Callable[[Array], Array], *, W: Array | None = None,
                    head: int | None = None, where=ALL, base_mask=None,
                    source_mask=None) -> dict[str, float]:
  """How much of a 1-d subspace patch's effect survives with only the row-space component.

  Args:
    cfg, params: the model.
    site: where v lives (e.g. `blocks.0.mlp.hook_post`).
    v: Float[Array, "d_site"], the learned direction.
    base, source: Int[Array, "batch pos"] paired inputs; the source activation along each direction
      is patched into the base run at `where`.
    metric: logits Float[Array, "batch pos vocab"] -> Float[Array, "batch"], e.g. the logit
      difference between the counterfactual and the base answer.
    W: downstream weights [d_site, d_out]; defaults to `downstream_weights(cfg, params, site,
    head)`.

  Returns:
    {"row_fraction": |v_row|^2 / |v|^2, "effect_full", "effect_row", "effect_null" (mean metric
    change against the unpatched base run), "surviving": effect_row / effect_full}. A surviving
    fraction far below 1 with a large effect_full points to the dormant-pathway illusion.
  """
  if W is None:
    W = downstream_weights(cfg, params, site, head)
  v = jnp.asarray(v, jnp.float32).reshape(-1)
  v_row, v_null = split_row_null(v, W)
  src_act = collect_sources(cfg, params, source, [site], attention_mask=source_mask)[site]
  clean = metric(forward(cfg, params, base, attention_mask=base_mask))
  eff = {}
  for name, d in (("full", v), ("row", v_row), ("null", v_null)):
    eff[name] = float(jnp.mean(
        _effect(cfg, params, base, src_act, site, d, where, metric, base_mask) - clean))
  row_frac = float(jnp.sum(v_row ** 2) / jnp.maximum(jnp.sum(v ** 2), 1e-30))
  surv = eff["row"] / eff["full"] if abs(eff["full"]) > 1e-12 else float("nan")
  return {"row_fraction": row_frac, "effect_full": eff["full"], "effect_row": eff["row"],
          "effect_null": eff["null"], "surviving": surv}
