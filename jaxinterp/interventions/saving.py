"""Saving and loading interventions: arrays with orbax, sites and types as JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions.basic import InterventionError, Where, WhereEach
from jaxinterp.interventions.runner import INTERVENTION_TYPES, Chain
from jaxinterp.runtime import files

SPEC_FILE = "interventions.json"
ARRAYS_DIR = "arrays"
SPEC_FORMAT = "jaxinterp.interventions/1"


def _encode_static(v):
  if isinstance(v, tuple):
    return {"__tuple__": [_encode_static(x) for x in v]}
  return v


def _decode_static(v):
  if isinstance(v, dict) and "__tuple__" in v:
    return tuple(_decode_static(x) for x in v["__tuple__"])
  return v


def _describe(obj, prefix: str, arrays: dict, include_sources: bool) -> dict:
  """JSON description of an intervention dataclass; array fields go into `arrays` under prefix.*"""
  name = type(obj).__name__
  if isinstance(obj, Chain):
    return {"type": "Chain", "items": [_describe(it, f"{prefix}.{i}", arrays, include_sources)
                                       for i, it in enumerate(obj.items)]}
  if name not in INTERVENTION_TYPES and not isinstance(obj, Where | WhereEach):
    raise InterventionError(f"cannot save an intervention of type {name}; known: "
                            f"{sorted(INTERVENTION_TYPES)}")
  spec: dict[str, Any] = {"type": name, "static": {}, "arrays": [], "none": [], "nested": {}}
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    if not f.metadata.get("pytree_node", True):
      spec["static"][f.name] = _encode_static(v)
    elif v is None or (f.name == "source" and not include_sources):
      spec["none"].append(f.name)
    elif isinstance(v, Where | WhereEach):
      spec["nested"][f.name] = _describe(v, f"{prefix}.{f.name}", arrays, include_sources)
    else:
      arrays[f"{prefix}.{f.name}"] = np.asarray(v)
      spec["arrays"].append(f.name)
  return spec


def _rebuild(spec: dict, prefix: str, arrays: Mapping[str, np.ndarray]):
  t = spec.get("type")
  if t == "Chain":
    return Chain(tuple(_rebuild(s, f"{prefix}.{i}", arrays) for i, s in enumerate(spec["items"])))
  types = dict(INTERVENTION_TYPES, Where=Where, WhereEach=WhereEach)
  if t not in types:
    raise InterventionError(f"unknown intervention type {t!r} in {SPEC_FILE}")
  kw = {k: _decode_static(v) for k, v in spec["static"].items()}
  kw.update({k: None for k in spec["none"]})
  for k in spec["arrays"]:
    key = f"{prefix}.{k}"
    if key not in arrays:
      raise InterventionError(f"array {key!r} listed in {SPEC_FILE} is missing from the checkpoint")
    kw[k] = jnp.asarray(arrays[key])
  kw.update({k: _rebuild(v, f"{prefix}.{k}", arrays) for k, v in spec["nested"].items()})
  return types[t](**kw)


def save_interventions(path: str, interventions: Mapping[str, Any], metadata: dict | None = None,
                       include_sources: bool = False) -> None:
  """Save interventions: arrays with orbax (`path/arrays`) and a JSON description of sites and types
  (`path/interventions.json`). Source activations are data, not parameters: dropped unless asked.
  """
  arrays: dict[str, np.ndarray] = {}
  sites = {}
  for i, (site, iv) in enumerate(interventions.items()):
    sites[site] = _describe(iv, f"iv{i}", arrays, include_sources)
    sites[site]["key"] = f"iv{i}"
  spec = {"format": SPEC_FORMAT, "sites": sites, "metadata": metadata or {}}
  # orbax keys must be simple: flatten "iv0.rotation" -> "iv0__rotation"
  flat = {k.replace(".", "__"): v for k, v in arrays.items()}
  files.save_with_record(path, flat, spec, arrays_dir=ARRAYS_DIR, record_file=SPEC_FILE)


def load_interventions(path: str) -> tuple[dict, dict]:
  """Load what `save_interventions` wrote: ({site: intervention}, metadata)."""
  flat, spec = files.load_with_record(path, arrays_dir=ARRAYS_DIR, record_file=SPEC_FILE,
                                      fmt=SPEC_FORMAT, error=InterventionError,
                                      missing="not a saved-interventions directory")
  arrays = {k.replace("__", "."): np.asarray(v) for k, v in flat.items()}
  out = {site: _rebuild(s, s["key"], arrays) for site, s in spec["sites"].items()}
  return out, spec.get("metadata", {})
