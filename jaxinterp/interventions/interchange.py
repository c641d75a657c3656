"""Interchange batches: which source each intervention reads, where, and in which order.

One batch of interchange data is a dict of arrays (all with the same leading batch axis):

  base         Int[Array, "batch pos"]: the inputs that are intervened on.
  source       Int[Array, "batch pos_s"] for every intervention; or {site: tokens} (one source input
               per site); or {site: [tokens, ...]} (one per intervention of a site's `Chain`).
  label        Int[Array, "batch"]: the counterfactual label.
  pos          Int[Array, "batch"] (optional): the label position (default: the last).
  base_mask, source_mask   Bool[Array, "batch pos"] (optional): attention masks; source_mask is
               given like `source`.
  positions    Int[Array, "batch"] or Int[Array, "batch n"] (optional): per-example base positions,
               for every intervention, per site ({site: ...}) or per item ({site: [...]}). They
               replace the intervention's `where` by `WhereEach(positions, heads=where.heads)`.
  source_positions   like `positions`: the source positions read for each selected base position
               (the j-th source position goes to the j-th base position). Default: the same
               positions as the base (and then base and source must have the same length).

A site's interventions may be a `Chain` (or a list, turned into one): each item reads its own
source activation and they apply left to right, so several trained interventions share a site (two
heads of one layer, two positions, or two variables in disjoint subspaces of one rotation).

Modes: "parallel" (pyvene's default): every source runs through the unmodified model. "serial"
(pyvene's serial unit locations): the sites, in the order of the dict, form a chain: the first
site's source run feeds the first intervention, which is applied in the *second* site's source run;
that intervened run feeds the second intervention, and so on; only the last site's intervention is
applied to the base run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions.autoencoder import Autoencoder
from jaxinterp.interventions.basic import InterventionError, Where, WhereEach
from jaxinterp.interventions.runner import Chain
from jaxinterp.models import forward

Array = jax.Array
MODES = ("parallel", "serial")


# --------------------------------------------------------------------------------------------------
# Interventions per site


def as_site(iv):
  """A list or tuple of interventions for one site becomes a `Chain` (applied left to right)."""
  return Chain(tuple(iv)) if isinstance(iv, (list, tuple)) else iv


def normalize(interventions: Mapping[str, Any]) -> dict:
  """{site: intervention}, with lists turned into `Chain`s."""
  return {s: as_site(iv) for s, iv in interventions.items()}


def items_of(iv) -> tuple:
  """The interventions at a site: a `Chain`'s items, else (iv,)."""
  return tuple(iv.items) if isinstance(iv, Chain) else (iv,)


def with_items(iv, items: Sequence) -> Any:
  """`iv` with its items replaced (inverse of `items_of`)."""
  return Chain(tuple(items)) if isinstance(iv, Chain) else items[0]


def needs_source(item) -> bool:
  """Whether an item is an interchange intervention still waiting for its source activation."""
  return hasattr(item, "source") and item.source is None and not isinstance(item, Autoencoder)


def _is_item_list(v) -> bool:
  return isinstance(v, (list, tuple)) and all(
      x is None or isinstance(x, (np.ndarray, jax.Array)) for x in v)


def per_item(spec, site: str, n: int, what: str) -> list:
  """A batch entry given for all sites, per site or per item, as one value per item of `site`."""
  if spec is None:
    return [None] * n
  if isinstance(spec, Mapping):
    if site not in spec:
      return [None] * n
    spec = spec[site]
  if _is_item_list(spec):
    if len(spec) != n:
      raise InterventionError(f"batch[{what!r}] lists {len(spec)} entries for {site!r}, which has "
                              f"{n} intervention(s)")
    return list(spec)
  return [spec] * n


# --------------------------------------------------------------------------------------------------
# Positions


def apply_positions(interventions: Mapping[str, Any], positions) -> dict:
  """Interventions whose `where` is replaced by per-example base positions (batch['positions'])."""
  if positions is None:
    return dict(interventions)
  if isinstance(positions, Mapping):
    unknown = sorted(set(positions) - set(interventions))
    if unknown:
      raise InterventionError(f"batch['positions'] names site(s) {unknown} that have no "
                              "intervention")
  out = {}
  for site, iv in interventions.items():
    its = items_of(iv)
    new = []
    for it, p in zip(its, per_item(positions, site, len(its), "positions"), strict=True):
      if p is not None:
        old = getattr(it, "where", None)
        if old is None:
          raise InterventionError(f"{type(it).__name__} at {site!r} has no `where`: it cannot take "
                                  f"batch['positions']")
        if isinstance(old, Where) and old.batch is not None:
          raise InterventionError(f"{site!r}: batch['positions'] cannot replace a `where` that "
                                  "also selects examples (Where.batch)")
        it = it.replace(where=WhereEach(jnp.asarray(p), heads=old.heads))
      new.append(it)
    out[site] = with_items(iv, new)
  return out


def base_positions(where, batch: int) -> Array | None:
  """The selected positions of each example, Int[Array, "batch n"], or None (all positions)."""
  if isinstance(where, WhereEach):
    p = jnp.asarray(where.positions)
    p = p[:, None] if p.ndim == 1 else p
    return jnp.broadcast_to(p, (batch, p.shape[1]))
  if isinstance(where, Where) and where.positions is not None:
    p = jnp.asarray(where.positions, jnp.int32)[None, :]
    return jnp.broadcast_to(p, (batch, p.shape[1]))
  return None


def align_source(src: Array, base_pos: Array, src_pos: Array, base_len: int) -> Array:
  """Source activations moved to the base positions that read them.

  Args:
    src: Float[Array, "batch pos_s ..."], the source run's activation.
    base_pos: Int[Array, "batch n"]; src_pos: Int[Array, "batch n"] or [batch] (negative values
      count from the end of each sequence).
    base_len: the base sequence length.

  Returns:
    Float[Array, "batch base_len ..."] with out[b, base_pos[b, j]] = src[b, src_pos[b, j]]; the
    other positions hold some source position (the intervention's `where` leaves them untouched).
  """
  B, Ps = src.shape[:2]
  src_pos = jnp.asarray(src_pos)
  src_pos = src_pos[:, None] if src_pos.ndim == 1 else src_pos
  src_pos = jnp.broadcast_to(src_pos, base_pos.shape)
  src_pos = jnp.where(src_pos < 0, src_pos + Ps, src_pos)
  base_pos = jnp.where(base_pos < 0, base_pos + base_len, base_pos)
  hit = jnp.arange(base_len)[None, :, None] == base_pos[:, None, :]  # [batch, base_len, n]
  idx = jnp.take_along_axis(src_pos, jnp.argmax(hit, -1), 1)  # [batch, base_len]
  return jnp.take_along_axis(src, idx.reshape((B, base_len) + (1,) * (src.ndim - 2)), 1)


# --------------------------------------------------------------------------------------------------
# Sources and logits


def _fill(site: str, iv, acts: list, batch: Mapping[str, Any]):
  """`iv` with each item that needs a source given `acts[i]` (aligned by source_positions)."""
  its = items_of(iv)
  B, P = np.shape(batch["base"])
  sps = per_item(batch.get("source_positions"), site, len(its), "source_positions")
  new = []
  for it, act, sp in zip(its, acts, sps, strict=True):
    if act is not None and needs_source(it):
      if sp is not None:
        bp = base_positions(it.where, B)
        if bp is None:
          raise InterventionError(f"{site!r}: source positions need base positions (a `where` "
                                  f"with positions, or batch['positions'])")
        act = align_source(act, bp, sp, P)
      it = it.replace(source=act)
    new.append(it)
  return with_items(iv, new)


def _sources(batch: Mapping[str, Any], site: str, iv) -> tuple[list, list]:
  its = items_of(iv)
  if "source" not in batch:
    raise InterventionError("an interchange batch needs 'source' tokens")
  if isinstance(batch["source"], Mapping) and site not in batch["source"] and any(
      needs_source(it) for it in its):
    raise InterventionError(f"batch['source'] has no source tokens for site {site!r}")
  toks = per_item(batch["source"], site, len(its), "source")
  masks = per_item(batch.get("source_mask"), site, len(its), "source_mask")
  return toks, masks


def source_activations(cfg, model_params, interventions: Mapping[str, Any],
                       batch: Mapping[str, Any]) -> dict[str, list]:
  """Each site's source activation per item ({site: [act or None]}), from the unmodified model.

  Items with the same source tokens (the same array) share one forward pass.
  """
  groups: list[list] = []  # [tokens, mask, {site}]
  want = {}
  for site, iv in interventions.items():
    toks, masks = _sources(batch, site, iv)
    want[site] = []
    for it, t, m in zip(items_of(iv), toks, masks, strict=True):
      if not needs_source(it):
        want[site].append(None)
        continue
      for g in groups:
        if g[0] is t and g[1] is m:
          break
      else:
        g = [t, m, set()]
        groups.append(g)
      g[2].add(site)
      want[site].append(g)
  caches = {}
  for g in groups:
    _, caches[id(g)] = forward(cfg, model_params, g[0], attention_mask=g[1], collect=tuple(g[2]))
  return {s: [None if g is None else caches[id(g)][s] for g in gs] for s, gs in want.items()}


def label_logits(logits: Array, batch: Mapping[str, Any]) -> Array:
  """Logits at each example's label position: Float[Array, "batch vocab"]."""
  pos = batch.get("pos")
  if pos is None:
    return logits[:, -1]
  return logits[jnp.arange(logits.shape[0]), jnp.asarray(pos)]


def _serial(cfg, model_params, ivs: dict, batch: Mapping[str, Any]) -> dict:
  """The last site's intervention, its source from the chain of intervened source runs."""
  prev = {}
  for site, iv in ivs.items():
    toks, masks = _sources(batch, site, iv)
    if any(t is not toks[0] for t in toks) or any(m is not masks[0] for m in masks):
      raise InterventionError(f"serial mode: the interventions at {site!r} must share one source "
                              f"input (the site's step in the chain)")
    _, cache = forward(cfg, model_params, toks[0], attention_mask=masks[0], interventions=prev,
                       collect=(site,))
    prev = {site: _fill(site, iv, [cache[site]] * len(items_of(iv)), batch)}
  return prev


def intervened_logits(cfg, model_params, interventions: Mapping[str, Any],
                      batch: Mapping[str, Any], *, mode: str = "parallel") -> Array:
  """Logits at the label position of the base run with source activations swapped in.

  Args:
    cfg, model_params: the model.
    interventions: {site: intervention, Chain or list}; items whose `source` is None read it
      from the batch's source inputs.
    batch: see the module docstring.
    mode: "parallel" or "serial" (see the module docstring).

  Returns:
    Float[Array, "batch vocab"].
  """
  if mode not in MODES:
    raise InterventionError(f"unknown mode {mode!r}; use one of {MODES}")
  ivs = apply_positions(normalize(interventions), batch.get("positions"))
  if mode == "serial":
    ivs = _serial(cfg, model_params, ivs, batch)
  else:
    acts = jax.lax.stop_gradient(source_activations(cfg, model_params, ivs, batch))
    ivs = {s: _fill(s, iv, acts[s], batch) for s, iv in ivs.items()}
  logits = forward(cfg, model_params, batch["base"], attention_mask=batch.get("base_mask"),
                   interventions=ivs)
  return label_logits(logits, batch)


# --------------------------------------------------------------------------------------------------
# Checking and slicing data


def _leading(v) -> list[int]:
  if isinstance(v, Mapping):
    return [n for x in v.values() for n in _leading(x)]
  if _is_item_list(v):
    return [n for x in v if x is not None for n in _leading(x)]
  return [np.shape(v)[0]] if np.ndim(v) else []


def check_batch(batch: Mapping[str, Any], interventions: Mapping[str, Any]) -> None:
  """Raise an `InterventionError` naming what is missing or mis-shaped in an interchange batch."""
  for key in ("base", "source", "label"):
    if key not in batch:
      raise InterventionError("an interchange batch needs 'base', 'source' and 'label'; missing "
                              f"{key!r}")
  base = np.shape(batch["base"])
  if len(base) != 2:
    raise InterventionError(f"batch['base'] must be tokens [batch, pos], got shape {base}")
  for site, iv in normalize(interventions).items():
    _sources(batch, site, iv)
  for key, v in batch.items():
    if key in ("base",):
      continue
    bad = [n for n in _leading(v) if n != base[0]]
    if bad:
      raise InterventionError(f"batch[{key!r}] has a leading (batch) axis of {bad[0]}; base has "
                              f"{base[0]} examples")
  if np.shape(batch["label"]) != (base[0],):
    raise InterventionError(f"batch['label'] must be [batch]={base[0]}, got "
                            f"{np.shape(batch['label'])}")


def take(data, idx):
  """Rows `idx` of every array in a batch (nested dicts and per-item lists included)."""
  if isinstance(data, Mapping):
    return {k: take(v, idx) for k, v in data.items()}
  if _is_item_list(data):
    return type(data)(None if v is None else take(v, idx) for v in data)
  return np.asarray(data)[idx]


def lift_positions(template: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[dict, dict]:
  """Move per-example positions held in the template into the data, so batches slice them.

  A `WhereEach` whose positions have one row per example of `data` (not one row for all) is
  dataset-length: its positions become `data['positions']` (per site and item) and are sliced with
  the examples. Any other number of rows is refused. When `data` has its own "positions" (e.g.
  held-out data for a template trained with per-example positions), those are used instead.

  Returns:
    (template, data) to train or evaluate on.
  """
  n = np.shape(data["base"])[0]
  tmpl = normalize(template)
  if data.get("positions") is not None:  # explicit positions replace the template's `where`s
    return tmpl, dict(data)
  lifted: dict[str, list] = {}
  for site, iv in tmpl.items():
    row = []
    for it in items_of(iv):
      w = getattr(it, "where", None)
      rows = np.shape(w.positions)[0] if isinstance(w, WhereEach) else 1
      if rows not in (1, n):
        raise InterventionError(f"WhereEach at {site!r} has positions for {rows} examples; the "
                                f"data have {n} (give one row per example, or one row for all)")
      row.append(np.asarray(w.positions) if rows == n and rows != 1 else None)
    if any(r is not None for r in row):
      lifted[site] = row
  if not lifted:
    return tmpl, dict(data)
  return tmpl, dict(data, positions={s: r if len(r) > 1 else r[0] for s, r in lifted.items()})
