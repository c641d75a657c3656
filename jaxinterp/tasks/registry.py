"""The task registry: every task by name, the metrics it offers, `get_task` / `task_names`, and
`with_metric`, which scores a task by another metric.

Tasks carry the EAP-IG paper's names (`hannamw/eap-ig-faithfulness`: `ioi`, `greater-than`,
`greater-than-price`, `greater-than-sequence`, `gender-bias`, `hypernymy-comma`,
`fact-retrieval-comma`, `sva`), MIB's (`mcqa`, `arithmetic-addition`, `arithmetic-subtraction`,
`arc-easy`, `arc-challenge`; `ioi` is shared) and the project's own (`hypernymy`, `country-capital`,
`logit-diff`, `induction`). Each offers the paper's metrics (`metrics.py` of the paper):

- `logit_diff`: the logit difference between right and wrong answers (answer sets: the mean logit
  for sva and greater-than, the summed logit for hypernymy, as the paper computes them);
- `prob_diff`: the same with probabilities (answer sets summed);
- `kl`, `js`: KL(clean || patched) and Jensen-Shannon divergence at the last token, averaged over
  the vocabulary as the paper does (`kl_div(...).mean(-1)`); these are losses (0 for the clean run);

and its default is the paper's choice: `prob_diff` for greater-than*, fact-retrieval* and sva,
`logit_diff` otherwise. The project's `hypernymy` and `country-capital` keep their earlier defaults
(`prob_diff`; logit difference or log p(country)). The old metric names stay: `task` (the task's
default) and `cross-entropy` (-log p of the single answer).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence

import jax.numpy as jnp

from jaxinterp.tasks import metrics
from jaxinterp.tasks.data import Task, TaskError

# --------------------------------------------------------------------------------------------------
# Per-example metrics by label layout: (logits, batch, clean_logits) -> Float[Array, "batch"].


def _pair_logit(logits, batch, clean_logits):
  return metrics.logit_diff(logits, batch.last, batch.labels["correct"], batch.labels["incorrect"])


def _pair_prob(logits, batch, clean_logits):
  return metrics.set_prob_diff(logits, batch.last, batch.labels["correct"],
                               batch.labels["incorrect"])


def _years_prob(logits, batch, clean_logits):
  return metrics.prob_diff(logits, batch.last, batch.labels["year_ids"], batch.labels["threshold"])


def _years_logit(logits, batch, clean_logits):
  return metrics.year_logit_diff(logits, batch.last, batch.labels["year_ids"],
                                 batch.labels["threshold"])


def _sets_logit_sum(logits, batch, clean_logits):
  return metrics.set_logit_sum_diff(logits, batch.last, batch.labels["correct"],
                                    batch.labels["incorrect"])


def _country(logits, batch, clean_logits):
  inc = batch.labels["incorrect"]
  diff = metrics.logit_diff(logits, batch.last, batch.labels["correct"], jnp.maximum(inc, 0))
  lp = metrics.log_prob(logits, batch.last, batch.labels["correct"])
  return jnp.where(inc >= 0, diff, lp)


def _country_prob(logits, batch, clean_logits):
  # A missing corrupted country (-1) is an empty set: p(country) alone.
  return metrics.set_prob_diff(logits, batch.last, batch.labels["correct"],
                               batch.labels["incorrect"])


def _induction(logits, batch, clean_logits):
  return metrics.log_prob(logits, batch.last, batch.labels["target"])


_PAIR = {"logit_diff": (_pair_logit, "logit(correct) - logit(incorrect)"),
         "prob_diff": (_pair_prob, "p(correct) - p(incorrect)")}
_YEARS = {"logit_diff": (_years_logit, "mean logit(years > YY) - mean logit(years <= YY)"),
          "prob_diff": (_years_prob, "p(years > YY) - p(years <= YY)")}
_SETS = {"logit_diff": (_sets_logit_sum, "sum logit(answers) - sum logit(corrupted answers)"),
         "prob_diff": (_pair_prob, "sum p(answers) - sum p(corrupted answers)")}
_SVA = {"logit_diff": (_pair_logit, "mean logit(right-number verbs) - mean logit(wrong-number "
                                    "verbs)"),
        "prob_diff": (_pair_prob, "sum p(right-number verbs) - sum p(wrong-number verbs)")}
_COUNTRY = {"logit_diff": (_country, "logit(country) - logit(corrupted country), else log "
                                     "p(country)"),
            "prob_diff": (_country_prob, "p(country) - p(corrupted country)")}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: its metrics and default, and where its name comes from.

  Attributes:
    name: the registry name.
    metrics: metric name -> (per-example function, one-line formula).
    default: the metric `get_task` scores with (`with_metric(task, "task")`).
    origin: "paper" (EAP-IG faithfulness paper), "mib" (MIB circuit track) or "jaxinterp".
    summary: what the task is, one line.
  """

  name: str
  metrics: dict[str, tuple[Callable, str]]
  default: str
  origin: str
  summary: str

  def task(self, metric: str) -> Task:
    """The `Task` scored by one of `metrics` (named `name` for the default, `name:metric` else)."""
    fn, formula = self.metrics[metric]
    name = self.name if metric == self.default else f"{self.name}:{metric}"
    return Task(name, fn, description=f"{self.summary}: {formula}")


_SPECS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("ioi", _PAIR, "logit_diff", "paper", "indirect object identification (IO vs S)"),
    TaskSpec("greater-than", _YEARS, "prob_diff", "paper", "greater-than on years"),
    TaskSpec("greater-than-price", _YEARS, "prob_diff", "paper", "greater-than on prices"),
    TaskSpec("greater-than-sequence", _YEARS, "prob_diff", "paper",
             "greater-than on number sequences"),
    TaskSpec("gender-bias", _PAIR, "logit_diff", "paper", "gendered pronoun (clean vs corrupted)"),
    TaskSpec("hypernymy-comma", _SETS, "logit_diff", "paper", "hypernymy ('X and other')"),
    TaskSpec("fact-retrieval-comma", _PAIR, "prob_diff", "paper",
             "country of a capital ('Kabul, the capital of')"),
    TaskSpec("sva", _SVA, "prob_diff", "paper", "subject-verb agreement"),
    TaskSpec("mcqa", _PAIR, "logit_diff", "mib", "multiple-choice answer letter"),
    TaskSpec("arithmetic-addition", _PAIR, "logit_diff", "mib", "addition result"),
    TaskSpec("arithmetic-subtraction", _PAIR, "logit_diff", "mib", "subtraction result"),
    TaskSpec("arc-easy", _PAIR, "logit_diff", "mib", "ARC-Easy answer letter"),
    TaskSpec("arc-challenge", _PAIR, "logit_diff", "mib", "ARC-Challenge answer letter"),
    TaskSpec("hypernymy", _SETS, "prob_diff", "jaxinterp", "hypernymy (answer-id sets)"),
    TaskSpec("country-capital", _COUNTRY, "logit_diff", "jaxinterp", "country of a capital"),
    TaskSpec("logit-diff", _PAIR, "logit_diff", "jaxinterp", "any answer pair (ids or id sets)"),
    TaskSpec("induction", {"log_prob": (_induction, "log p(repeated token)")}, "log_prob",
             "jaxinterp", "induction"),
)}

# MIB spells some task names with underscores on its command line (`arithmetic_addition`).
ALIASES = {"arithmetic_addition": "arithmetic-addition", "arithmetic_subtraction":
           "arithmetic-subtraction", "arc_easy": "arc-easy", "arc_challenge": "arc-challenge"}


def task_names() -> list[str]:
  """Names of the registered tasks (the paper's, MIB's and the project's)."""
  return sorted(_SPECS)


def task_spec(name: str) -> TaskSpec:
  """The `TaskSpec` of a registered task (aliases such as `arc_easy` accepted)."""
  spec = _SPECS.get(ALIASES.get(name, name))
  if spec is None:
    by = {o: [n for n, s in sorted(_SPECS.items()) if s.origin == o]
          for o in ("paper", "mib", "jaxinterp")}
    raise TaskError(f"unknown task {name!r}{did_you_mean(name, (*_SPECS, *ALIASES))}; known "
                    f"tasks: {', '.join(task_names())} (the EAP-IG "
                    f"paper's: {', '.join(by['paper'])}; MIB's: {', '.join(by['mib'])}, ioi)")
  return spec


def did_you_mean(name: str, choices: Sequence[str]) -> str:
  """" (did you mean 'x'?)" for the choice closest to `name` (same up to case, '-' vs '_' and
  spaces, else `difflib`'s closest above 0.75), or "" when none is close."""
  def norm(x):
    return str(x).lower().replace("_", "-").replace(" ", "")

  same = [c for c in choices if norm(c) == norm(name)]
  close = same or difflib.get_close_matches(norm(name), [norm(c) for c in choices], 1, 0.75)
  if not close:
    return ""
  hit = same[0] if same else next(c for c in choices if norm(c) == close[0])
  return f" (did you mean {hit!r}?)"


def get_task(name: str) -> Task:
  """The registered `Task` called `name`, scored by its default metric (see `task_names()`)."""
  spec = task_spec(name)
  return spec.task(spec.default)


# --------------------------------------------------------------------------------------------------
# Metrics

METRICS = ("task", "logit_diff", "prob_diff", "kl", "js", "cross-entropy")
_METRIC_ALIASES = {"logit-diff": "logit_diff", "prob-diff": "prob_diff", "kl_divergence": "kl",
                   "js_divergence": "js", "kl-divergence": "kl", "js-divergence": "js"}


def _kl(logits, batch, clean_logits):
  return metrics.kl_divergence(logits, clean_logits, batch.last, vocab_mean=True)


def _js(logits, batch, clean_logits):
  return metrics.js_divergence(logits, clean_logits, batch.last, vocab_mean=True)


def _ce(logits, batch, clean_logits):
  target = batch.labels["target"] if "target" in batch.labels else batch.labels["correct"]
  if target.ndim > 1:
    raise TaskError("cross-entropy needs a single answer id per example")
  return metrics.cross_entropy(logits, batch.last, target)


def metric_names(task: str) -> tuple[str, ...]:
  """The metrics a registered task offers, its default first (`task`, `kl`, `js` and
  `cross-entropy` work for every task too)."""
  spec = task_spec(task)
  return (spec.default,) + tuple(m for m in spec.metrics if m != spec.default)


def with_metric(task: Task, metric: str) -> Task:
  """The task scored by another per-example metric.

  Args:
    task: a task from `get_task` (or any `Task`: then only `task`, `kl`, `js`, `cross-entropy`).
    metric: `logit_diff` or `prob_diff` (as the EAP-IG paper defines them for this task), `kl` or
      `js` (divergence from the clean run at the last real token, averaged over the vocabulary as
      the paper does; they need the clean logits and are losses: `higher_is_better=False`), `task`
      (keep the task as it is) or `cross-entropy` (-log p of the `target` or `correct` answer).

  Returns:
    A `Task`; the task's own default metric gives the registered task back unchanged.
  """
  metric = _METRIC_ALIASES.get(metric, metric)
  base = task.name.split(":")[0]
  if metric == "task":
    return task
  if metric == "kl":
    return Task(f"{base}:kl", _kl, needs_clean_logits=True, higher_is_better=False,
                description="KL(clean || patched) at the last real token, over |V|")
  if metric == "js":
    return Task(f"{base}:js", _js, needs_clean_logits=True, higher_is_better=False,
                description="JS(patched, clean) at the last real token, over |V|")
  if metric == "cross-entropy":
    return Task(f"{base}:cross-entropy", _ce, higher_is_better=False, description="-log p(answer)")
  if metric not in METRICS:
    raise TaskError(f"unknown metric {metric!r}{did_you_mean(metric, METRICS)}; choose from "
                    f"{METRICS}")
  spec = _SPECS.get(ALIASES.get(base, base))
  if spec is None or metric not in spec.metrics:
    have = metric_names(base) if spec is not None else ()
    raise TaskError(f"task {base!r} has no {metric!r} metric; it offers "
                    f"{', '.join(have + ('kl', 'js', 'cross-entropy'))}")
  return spec.task(metric)
