"""Named sites: the only thing `models/` knows about interpretability.

Every layer passes its intermediate activations through `sites(name, x)`. A `Sites` object is an
explicit side input to one forward call: it holds the interventions to apply (a mapping from site
name to a callable `x -> x'`, usually a pytree from `jaxinterp.interventions`) and the names to
collect. It is created fresh inside every (traced) call, so nothing is mutable across calls.

Site names follow TransformerLens: `hook_embed`, `blocks.3.attn.hook_z`, `blocks.3.hook_mlp_out`,
...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping

import jax


class SiteError(KeyError):
  """An intervention or collection names a site the model does not have."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


class Sites:
  """Interventions to apply and activations to collect during one forward pass."""

  def __init__(self, interventions: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
               collect: Iterable[str] = ()):
    self.interventions = dict(interventions or {})
    self.collect = frozenset(collect)
    self.cache: dict[str, jax.Array] = {}
    self.visited: list[str] = []

  def wants(self, name: str) -> bool:
    """Whether the caller intervenes on or collects `name` (so an optional site must be computed).
    """
    return name in self.interventions or name in self.collect

  def __call__(self, name: str, x: jax.Array) -> jax.Array:
    self.visited.append(name)
    fn = self.interventions.get(name)
    if fn is not None:
      y = fn(x)
      if getattr(y, "shape", None) != x.shape:
        raise SiteError(f"intervention at {name!r} returned shape {getattr(y, 'shape', None)}, "
                        f"expected {x.shape}")
      x = y.astype(x.dtype)
    if name in self.collect:
      self.cache[name] = x
    return x

  def check_all_visited(self) -> None:
    """Raise a `SiteError` naming any requested site that the forward never reached."""
    seen = set(self.visited)
    missing = sorted((set(self.interventions) | self.collect) - seen)
    if missing:
      hints = []
      for m in missing:
        close = difflib.get_close_matches(m, sorted(seen), n=3)
        hints.append(f"{m!r}"
                     + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
      raise SiteError("unknown site(s): " + "; ".join(hints) +
                      ". Optional sites such as hook_result and hook_q_input are computed only "
                      "when requested; list every site with models.site_names(cfg).")

