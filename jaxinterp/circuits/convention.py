"""What the sign of an edge score means: the two score conventions, and how a graph records its own.

- `metric` (jaxinterp's attribution, in memory): `score = m(edge ablated) - m(clean)`, the change of
  a metric where higher means more of the behaviour (logit or probability difference), averaged over
  examples. Important edges have negative scores.
- `loss` (the PyTorch EAP-IG package and MIB): the change of a loss when the edge is ablated, so
  higher means more important. EAP-IG's attribution uses the metric negated (`loss=True`), or a
  divergence (KL, JS), which is a loss already.

Signed selection (`absolute=False`) always ranks by importance (`importance_sign * score`, higher
first), so it picks the same edges whatever the convention, and the same as EAP-IG's
`apply_topn(absolute=False)` and MIB do. A graph's convention is its meta's `score_convention`;
files are written in the `loss` convention (`circuits.io`), so EAP-IG and MIB read them as we do. A
graph without the key is in the `loss` convention (EAP-IG's and MIB's files have no meta), except a
file written by jaxinterp before the key existed (its meta has `jaxinterp_version`): those hold
`metric` scores (or `loss` ones if their `metric` was `kl` or `cross-entropy`).

A metric-convention score relates to the EAP-IG package's own number on the same examples as
`eap = -score / batch_size` for its gradient methods (it sums the per-batch means of its loss) and
`eap = -score` for exact patching; files hold `-score` (our units, EAP-IG's sign).

What a user sees (plots, the HTML viewer, the console) is always in the files' sign, whatever the
in-memory convention: `displayed(scores, convention)` turns scores into it, and `DISPLAYED` is the
one line that says so in a legend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

KEY = "score_convention"
METRIC = "metric"
LOSS = "loss"
CONVENTIONS = (METRIC, LOSS)
_LOSS_METRICS = ("kl", "js", "cross-entropy")
DISPLAYED = "higher = more important (graph.json's sign, as EAP-IG and MIB)"
"""What displayed scores mean, for legends and console headers (`displayed`)."""


def check(convention: str) -> str:
  """`convention` itself, or ValueError if it is not one of `CONVENTIONS`."""
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown score convention {convention!r}; choose from {CONVENTIONS}")
  return convention


def of(meta: Mapping[str, Any]) -> str:
  """The convention a graph's `meta` records (see the module docstring for graphs without one)."""
  conv = meta.get(KEY)
  if conv in CONVENTIONS:
    return conv
  if "jaxinterp_version" in meta and conv is None:  # written before the key existed
    return LOSS if meta.get("metric") in _LOSS_METRICS else METRIC
  return LOSS


def for_task(task: Any) -> str:
  """The convention of attribution scores computed with `task`'s metric: `metric` when the metric
  is higher-is-better, `loss` for losses (KL, JS, cross-entropy)."""
  return METRIC if getattr(task, "higher_is_better", True) else LOSS


def importance_sign(convention: str) -> float:
  """+1 or -1: `importance = sign * score` is higher for more important edges."""
  return -1.0 if check(convention) == METRIC else 1.0


def displayed(scores, score_convention: str):
  """Scores in the sign that plots, the viewer, the console and graph.json show: higher = more
  important (`DISPLAYED`). Negated in the `metric` convention, unchanged in the `loss` one, and
  computed as `circuits.io` writes graph.json (`score * sign + 0`, so no `-0.0`): a displayed score
  equals the file's bit for bit.

  scores: a number or an array (Float[ndarray, "..."]); the same type and dtype come back.
  """
  sign = importance_sign(score_convention)
  if isinstance(scores, np.ndarray):
    return scores * scores.dtype.type(sign) + scores.dtype.type(0)
  return scores * sign + 0.0
