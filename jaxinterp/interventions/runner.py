"""Running a model with interventions: composing them (`Chain`), collecting source activations for
interchange, and the forward with interventions at named sites."""

from __future__ import annotations

import flax.struct

from jaxinterp.interventions.autoencoder import Autoencoder
from jaxinterp.interventions.basic import Add, Array, InterventionError, MeanAblate, Patch, Zero
from jaxinterp.interventions.basis import Collect, GaussianNoise, Interchange, SigmoidMask, Subtract
from jaxinterp.interventions.das import (
  BoundlessRotatedSpace,
  LowRankRotatedSpace,
  RotatedSpace,
  SigmoidMaskRotatedSpace,
)
from jaxinterp.models import forward


@flax.struct.dataclass
class Chain:
  """Several interventions at one site, applied left to right."""

  items: tuple

  def __call__(self, x: Array) -> Array:
    for it in self.items:
      x = it(x).astype(x.dtype)
    return x



INTERVENTION_TYPES = {c.__name__: c for c in (
    Patch, Zero, MeanAblate, Add, Subtract, Interchange, GaussianNoise, Collect, SigmoidMask,
    RotatedSpace, BoundlessRotatedSpace, SigmoidMaskRotatedSpace, LowRankRotatedSpace, Autoencoder,
    Chain)}


def _check_callable(site: str, iv) -> None:
  if not callable(iv):
    raise InterventionError(f"the intervention at {site!r} is a {type(iv).__name__}, not a "
                            "callable x -> x' (see jaxinterp.interventions)")


def collect_sources(cfg, params, sources, sites, *, attention_mask=None) -> dict[str, Array]:
  """Run the model on source inputs and return each site's activation (for interchange).

  Args:
    cfg, params: the model (`models.forward` arguments).
    sources: Int[Array, "batch pos"] used for every site, or {site: tokens} for multi-source
      interchange (a different source input per site; identical arrays are run once).
    sites: the site names to collect.
    attention_mask: Bool[Array, "batch pos"] for the sources (or a {site: mask} dict).

  Returns:
    {site: activation} with each site's own source activation.
  """
  sites = list(sites)
  if not isinstance(sources, dict):
    sources = {s: sources for s in sites}
  missing = [s for s in sites if s not in sources]
  if missing:
    raise InterventionError(f"no source input given for site(s) {missing}")
  masks = attention_mask if isinstance(attention_mask, dict) else {s: attention_mask for s in sites}
  groups: list[tuple] = []  # (tokens, mask, [sites])
  for s in sites:
    for g in groups:
      if g[0] is sources[s] and g[1] is masks.get(s):
        g[2].append(s)
        break
    else:
      groups.append((sources[s], masks.get(s), [s]))
  out = {}
  for toks, mask, names in groups:
    _, cache = forward(cfg, params, toks, attention_mask=mask, collect=tuple(names))
    out.update(cache)
  return out


def _waits(iv) -> bool:
  """An interchange intervention without its source activation yet."""
  return hasattr(iv, "source") and iv.source is None and not isinstance(iv, Autoencoder)


def with_sources(interventions: dict, sources: dict) -> dict:
  """Fill the `source` field of each interchange intervention from {site: source activation}."""
  out = {}
  for site, iv in interventions.items():
    if site in sources and isinstance(iv, Chain):  # every item still without a source
      iv = Chain(tuple(it.replace(source=sources[site]) if _waits(it) else it for it in iv.items))
    elif site in sources:
      if not hasattr(iv, "source"):
        raise InterventionError(f"{type(iv).__name__} at {site!r} takes no source activation")
      iv = iv.replace(source=sources[site])
    out[site] = iv
  return out


def run(cfg, params, tokens, interventions: dict, *, sources=None, source_mask=None, collect=(),
        **kw):
  """Forward with interventions at several sites in one call.

  Interchange interventions whose `source` is None get it from `sources` (tokens for all sites, or
  {site: tokens} for multi-source), collected first with the frozen model. `Collect` entries are
  not applied; their selected values are returned.

  Returns:
    (logits Float[Array, "batch pos vocab"], {site: collected values}).
  """
  for site, iv in interventions.items():
    _check_callable(site, iv)
  collects = {s: iv for s, iv in interventions.items() if isinstance(iv, Collect)}
  active = {s: iv for s, iv in interventions.items() if not isinstance(iv, Collect)}
  need = [s for s, iv in active.items()
          if any(_waits(it) for it in (iv.items if isinstance(iv, Chain) else (iv,)))]
  if need:
    if sources is None:
      raise InterventionError(f"interchange intervention(s) at {need} have no source activation; "
                              "pass `sources=` (tokens, or {site: tokens})")
    active = with_sources(active, collect_sources(cfg, params, sources, need,
                                                  attention_mask=source_mask))
  names = tuple(set(collect) | set(collects))
  logits, cache = forward(cfg, params, tokens, interventions=active, collect=names, **kw) if names \
      else (forward(cfg, params, tokens, interventions=active, **kw), {})
  cache = dict(cache)
  for s, c in collects.items():
    cache[s] = c.select(cache[s])
  return logits, cache
