"""The task registry: each task's per-example metric, `get_task` / `task_names`, and `with_metric`,
which scores a task by KL or cross-entropy instead.
"""

from __future__ import annotations

from typing import Dict, List

import jax.numpy as jnp

from jaxinterp import metrics
from jaxinterp.tasks.data import Task, TaskError


def _ld(logits, batch, clean_logits):
  return metrics.logit_diff(logits, batch.last, batch.labels["correct"], batch.labels["incorrect"])


def _gt(logits, batch, clean_logits):
  return metrics.prob_diff(logits, batch.last, batch.labels["year_ids"], batch.labels["threshold"])


def _hyp(logits, batch, clean_logits):
  return metrics.set_prob_diff(logits, batch.last, batch.labels["correct"], batch.labels["incorrect"])


def _country(logits, batch, clean_logits):
  inc = batch.labels["incorrect"]
  diff = metrics.logit_diff(logits, batch.last, batch.labels["correct"], jnp.maximum(inc, 0))
  lp = metrics.log_prob(logits, batch.last, batch.labels["correct"])
  return jnp.where(inc >= 0, diff, lp)


def _induction(logits, batch, clean_logits):
  return metrics.log_prob(logits, batch.last, batch.labels["target"])


_TASKS: Dict[str, Task] = {
    "ioi": Task("ioi", _ld, description="indirect object identification: logit(IO) - logit(S)"),
    "greater-than": Task("greater-than", _gt, description="p(year > YY) - p(year <= YY)"),
    "gender-bias": Task("gender-bias", _ld,
                        description="logit(clean answer) - logit(corrupted answer)"),
    "sva": Task("sva", _ld, description="subject-verb agreement: mean logit right - wrong number verbs"),
    "country-capital": Task("country-capital", _country,
                            description="logit(country) - logit(corrupted country), else log p(country)"),
    "hypernymy": Task("hypernymy", _hyp, description="sum p(answers) - sum p(corrupted answers)"),
    "logit-diff": Task("logit-diff", _ld, description="mean logit of correct - incorrect answer ids"),
    "induction": Task("induction", _induction, description="log p(repeated token), induction"),
}


def task_names() -> List[str]:
  """Names of the registered tasks."""
  return sorted(_TASKS)


def get_task(name: str) -> Task:
  """The registered `Task` called `name` (see `task_names()`)."""
  if name not in _TASKS:
    raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
  return _TASKS[name]


METRICS = ("task", "kl", "cross-entropy")


def _kl(logits, batch, clean_logits):
  return metrics.kl_divergence(logits, clean_logits, batch.last)


def _ce(logits, batch, clean_logits):
  target = batch.labels["target"] if "target" in batch.labels else batch.labels["correct"]
  if target.ndim > 1:
    raise TaskError("cross-entropy needs a single answer id per example")
  return metrics.cross_entropy(logits, batch.last, target)


def with_metric(task: Task, metric: str) -> Task:
  """The task scored by another per-example metric.

  "task" keeps the task's own metric; "kl" is KL(clean || patched) at the last real token (0 for the
  clean model, needs the clean logits); "cross-entropy" is -log p of the answer (`target` or
  `correct` label).
  """
  if metric == "task":
    return task
  if metric == "kl":
    return Task(f"{task.name}:kl", _kl, needs_clean_logits=True,
                description="KL(clean || patched) at the last real token")
  if metric == "cross-entropy":
    return Task(f"{task.name}:cross-entropy", _ce, description="-log p(answer)")
  raise TaskError(f"unknown metric {metric!r}; choose from {METRICS}")
