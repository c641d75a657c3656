"""Ensembles of attribution methods: `--method=EAP+EAP-IG-inputs` averages rank-normalised scores.

`ensemble(*methods)` composes registered methods into one `base.Method` (`attribution.get_method`
builds it on the fly for an `A+B` name). Each member scores the same batches; the driver averages
their sums over the examples as usual, keeping the members apart (`[members, ...]`), and the
ensemble's `finalize` then rank-normalises every member and averages:

    ensemble[e] = mean_i sign(v_i[e]) * rank_i(|v_i[e]|) / n,    v_i = c_i s_i

with rank_i the rank (1 = smallest, ties averaged) of |s_i[e]| among the n valid entries (edges,
nodes or neurons) of member i, and c_i = +1 or -1 orienting member i's scores so that higher means
more important (`circuits.convention.importance_sign` of its convention: EAP's scores of a
logit-difference task are negated, IFR's proportions are not). The result is unitless in [-1, 1],
in the `loss` convention (higher = more important): the sign of an entry where the members agree
is kept, and an entry the members rank highly with opposite signs cancels out (|score| ranks it
low). Members' scales (metric units, IFR's proportions) no longer matter.

Members that score batch by batch keep the driver's batching, resuming and bootstrap. If a member
fits the whole dataset at once (`Method.fit`), the ensemble does too: it then runs its batch members
over `EnsembleOptions.batch_size` batches itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxinterp.attribution import base
from jaxinterp.circuits import convention


@dataclasses.dataclass(frozen=True)
class EnsembleOptions(base.Options):
  """Options of an ensemble.

  Attributes:
    members: each member's own options, in order.
    batch_size: examples per batch when a member fits the whole dataset (the ensemble then batches
      its other members itself).
  """

  members: tuple = ()
  batch_size: int = 16


def rank_normalise(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """sign(s) * rank(|s|) / n over the `valid` entries (ranks 1..n, ties averaged), 0 elsewhere.

  Args:
    scores, valid: arrays of one shape (valid is bool).

  Returns:
    float64 array of that shape, in [-1, 1].
  """
  s = np.asarray(scores, np.float64)[valid]
  out = np.zeros(valid.shape, np.float64)
  if s.size == 0:
    return out
  mag = np.abs(s)
  _, inverse, counts = np.unique(mag, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts)  # the highest rank of each distinct value
  avg = upper - (counts - 1) / 2.0
  out[valid] = np.sign(s) * avg[inverse] / s.size
  return out


@dataclasses.dataclass(frozen=True)
class Ensemble(base.Method):
  """A `base.Method` whose scores are the rank-normalised average of its `members`' scores."""

  members: tuple = ()

  @property
  def option_names(self) -> frozenset[str]:
    """Its own options (remat, level, batch_size) and every member's."""
    names = {f.name for f in dataclasses.fields(EnsembleOptions)} - {"members"}
    return frozenset(names.union(*(m.option_names for m in self.members)))

  def make_options(self, **kwargs) -> EnsembleOptions:
    """Each member's options from the keywords it has (every keyword must be some member's or the
    ensemble's own); `level` must be one every member scores."""
    unknown = sorted(set(kwargs) - self.option_names)
    if unknown:
      raise base.AttributionError(f"{self.name} has no option {unknown[0]!r}; its options are "
                                  f"{', '.join(sorted(self.option_names))}")
    level = kwargs.get("level", "edge")
    for m in self.members:
      if level not in m.levels:
        raise base.AttributionError(f"ensemble member {m.name} has no {level} level")
    members = tuple(m.make_options(**{k: v for k, v in kwargs.items() if k in m.option_names})
                    for m in self.members)
    own = {f.name for f in dataclasses.fields(EnsembleOptions)}
    return EnsembleOptions(members=members, **{k: v for k, v in kwargs.items() if k in own})

  def option_values(self, options: EnsembleOptions) -> dict:
    """Its own values and its members' (each name once: members share remat and level)."""
    out = {}
    for m, o in zip(self.members, options.members, strict=True):
      out.update(m.option_values(o))
    own = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
           if f.name not in ("members", "progress")}
    return dict(out, **own)

  def valid_mask(self, cfg, options: EnsembleOptions) -> np.ndarray:
    """Bool [members, ...]: the members' valid entries, stacked (what the driver sums)."""
    return np.stack([m.valid_mask(cfg, o)
                     for m, o in zip(self.members, options.members, strict=True)])

  def finalize(self, cfg, task, options: EnsembleOptions, mean_scores: np.ndarray) -> np.ndarray:
    """[members, ...] mean scores -> the ensemble's scores [...]: each member's rank-normalised
    in the loss convention, averaged (`fit` does the same for an ensemble with a fit member)."""
    return _finalize(self.members)(cfg, task, options, mean_scores)

  def output_mask(self, cfg, options: EnsembleOptions) -> np.ndarray:
    """Bool array of the ensemble's scores: the entries valid for any member."""
    return self.valid_mask(cfg, options).any(0)


def _member_options(options: EnsembleOptions, o: base.Options) -> base.Options:
  return dataclasses.replace(o, progress=options.progress)


def _finalize(members: Sequence[base.Method]):
  def finalize(cfg, task, options: EnsembleOptions, mean_scores: np.ndarray) -> np.ndarray:
    """[members, ...] mean scores -> the ensemble's scores [...] (loss convention)."""
    valid = [m.valid_mask(cfg, o) for m, o in zip(members, options.members, strict=True)]
    signs = [convention.importance_sign(m.score_convention(task)) for m in members]
    return np.mean([rank_normalise(c * s, v)
                    for c, s, v in zip(signs, mean_scores, valid, strict=True)], 0)
  return finalize


def _score_batch(members: Sequence[base.Method]):
  def score_batch(cfg, task, params, batch, ablation, options: EnsembleOptions) -> base.BatchScores:
    """Every member's sums on the batch, stacked [members, ...]."""
    outs = [m.score_batch(cfg, task, params, batch, ablation, _member_options(options, o))
            for m, o in zip(members, options.members, strict=True)]
    scores = jnp.stack([jnp.asarray(o.scores, jnp.float32) for o in outs])
    return base.BatchScores(scores, outs[-1].metric, outs[0].clean, outs[0].clean_total)
  return score_batch


def _fit(members: Sequence[base.Method]):
  finalize = _finalize(members)

  def fit(cfg, params, dataset, ablation, options: EnsembleOptions) -> base.FitResult:
    """Fit members fit; batch members are summed over `options.batch_size` batches here."""
    means, clean, extras = [], None, {}
    for m, o in zip(members, options.members, strict=True):
      o = _member_options(options, o)
      if m.fit is not None:
        r = m.fit(cfg, params, dataset, ablation, o)
        means.append(np.asarray(r.scores, np.float64))
        clean = r.clean_metric if clean is None else clean
        extras.update({f"{m.name}:{k}": v for k, v in r.extras.items()})
        continue
      total, c_total = 0.0, 0.0
      for i, batch in enumerate(dataset.batches(options.batch_size)):
        out = m.score_batch(cfg, dataset.task, params, batch, ablation, o)
        s = np.asarray(out.scores, np.float64)
        base.check_finite(s, i, f"a {m.name} score")
        total, c_total = total + s, c_total + float(out.clean_total)
      means.append(total / len(dataset))
      clean = c_total / len(dataset) if clean is None else clean
    valid = [m.valid_mask(cfg, o) for m, o in zip(members, options.members, strict=True)]
    means = [np.where(v, s, 0.0) for s, v in zip(means, valid, strict=True)]
    return base.FitResult(finalize(cfg, dataset.task, options, np.stack(means)), clean, extras)
  return fit


def ensemble(*methods: base.Method) -> Ensemble:
  """One method whose scores average the rank-normalised scores of `methods` (two or more).

  Its name joins theirs with "+"; it supports the interventions every member supports, reads the
  corrupted prompts if any member does, and scores edges, nodes or neurons (`level`) if every
  member can.
  """
  if len(methods) < 2:
    raise base.AttributionError(f"an ensemble needs two or more methods, got {len(methods)}")
  names = [m.name for m in methods]
  if len(set(names)) != len(names):
    raise base.AttributionError(f"ensemble members must differ, got {'+'.join(names)}")
  allowed = None
  for m in methods:
    if m.interventions is not None:
      allowed = m.interventions if allowed is None else tuple(i for i in allowed
                                                              if i in m.interventions)
  if allowed == ():
    raise base.AttributionError(f"{'+'.join(names)}: its members share no intervention")
  whole = any(m.fit is not None for m in methods)
  return Ensemble(
      "+".join(names), "mean of the rank-normalised scores of " + ", ".join(names),
      None if whole else _score_batch(methods), EnsembleOptions, allowed,
      fit=_fit(methods) if whole else None, needs_corrupted=any(m.needs_corrupted for m in methods),
      ablates=any(m.ablates for m in methods),
      convention=convention.LOSS, members=tuple(methods),
      levels=tuple(lv for lv in base.LEVELS if all(lv in m.levels for m in methods)),
      checkpoints_always=any(m.checkpoints_always for m in methods))
