"""Does the model do the task? Checks run before attribution, and the rows it gets right.

`check(cfg, params, dataset)` runs the clean and the corrupted prompts and reports, per row, the
task's own metric on each (its default metric, e.g. `logit_diff` for ioi, whatever metric the
attribution then uses: KL and JS are 0 on the clean run by construction and say nothing about the
task) and whether the clean answer is the top-1 next token. A row is **right** when its clean metric
beats its corrupted one (is higher; lower for a loss): the rule `filter_correct` keeps rows by, as
the EAP-IG and MIB papers keep the examples the model gets right.

Top-1 accuracy is the fraction of rows whose argmax next token (over the whole vocabulary, at the
position the metric reads) is a clean answer: the single answer id (`correct`, `target`); for tasks
without a single answer, any member of the answer set: a right-number verb (sva), a hypernym
(hypernymy), a year above the threshold YY (greater-than: `year_ids[YY+1:]`). It is low when the
model puts a space or another token first, even where the metric says the model prefers the right
answers; the fraction of right rows is the check that matters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import tasks
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.runtime import distributed, inputs
from jaxinterp.tasks import metrics

FILTERS = ("none", "correct")


@dataclasses.dataclass(frozen=True)
class TaskCheck:
  """Per-row results of the clean and the corrupted run under the task's own metric.

  Attributes:
    task: the task's name; metric: its metric's name (e.g. "logit_diff").
    higher_is_better: the metric's direction (False for a loss).
    clean: float [N], the metric of each row's clean run.
    corrupted: float [N], the metric of each row's corrupted run (the clean row's labels), or None
      when the data has no corrupted prompts.
    top1: bool [N], whether the clean run's top-1 next token is a clean answer (None when the
      labels name no answer).
  """

  task: str
  metric: str
  higher_is_better: bool
  clean: np.ndarray
  corrupted: np.ndarray | None
  top1: np.ndarray | None

  @property
  def right(self) -> np.ndarray | None:
    """bool [N]: the clean metric beats the corrupted one (None without corrupted prompts)."""
    if self.corrupted is None:
      return None
    sign = 1.0 if self.higher_is_better else -1.0
    return sign * (self.clean - self.corrupted) > 0

  @property
  def does_task(self) -> bool:
    """Whether the mean clean metric beats the mean corrupted one (True without corrupted
    prompts: nothing to compare)."""
    if self.corrupted is None:
      return True
    return _beats(float(self.clean.mean()), float(self.corrupted.mean()), self.higher_is_better)

  def summary(self) -> dict:
    """The numbers recorded in `meta["task_check"]` (means, fractions, counts)."""
    n = int(self.clean.size)
    right, top1 = self.right, self.top1
    return {"task": self.task, "metric": self.metric, "n_rows": n,
            "clean_mean": float(self.clean.mean()),
            "corrupted_mean": None if self.corrupted is None else float(self.corrupted.mean()),
            "clean_beats_corrupted": None if right is None else float(right.mean()),
            "n_right": None if right is None else int(right.sum()),
            "top1_accuracy": None if top1 is None else float(top1.mean()),
            "does_task": self.does_task}

  def line(self) -> str:
    """`task check (ioi, logit_diff): clean 2.91, corrupted -2.91; clean beats corrupted in 98%
    of rows (63/64); clean answer top-1 in 84% (54/64)`."""
    n = self.clean.size
    s = f"task check ({self.task}, {self.metric}): clean {self.clean.mean():.4f}"
    if self.corrupted is not None:
      right = self.right
      s += (f", corrupted {self.corrupted.mean():.4f}; clean beats corrupted in "
            f"{right.mean():.0%} of rows ({int(right.sum())}/{n})")
    if self.top1 is not None:
      s += f"; clean answer top-1 in {self.top1.mean():.0%} ({int(self.top1.sum())}/{n})"
    return s

  def warning(self) -> str | None:
    """One line when the model does not do the task (mean clean metric does not beat the
    corrupted one), else None."""
    if self.does_task:
      return None
    than = "exceed" if self.higher_is_better else "fall below"
    acc = "" if self.top1 is None else f", the clean answer top-1 in {self.top1.mean():.0%}"
    return (f"the clean metric ({self.clean.mean():.4f}) does not {than} the corrupted one "
            f"({self.corrupted.mean():.4f}): the model does not do this task on these rows "
            f"(right in {self.right.mean():.0%}{acc}), so a circuit found here explains no "
            f"behaviour; check the prompts and answers, or keep the rows it gets right with "
            f"--filter=correct")


def _beats(a: float, b: float, higher_is_better: bool) -> bool:
  return a > b if higher_is_better else a < b


def empty_warning(m_full: float, m_empty: float, higher_is_better: bool) -> str | None:
  """One line when the full model's metric does not beat the empty circuit's, else None."""
  if _beats(m_full, m_empty, higher_is_better):
    return None
  than = "exceed" if higher_is_better else "fall below"
  return (f"the clean metric ({m_full:.4f}) does not {than} the empty circuit's ({m_empty:.4f}): "
          f"ablating every edge does not remove the behaviour measured, so faithfulness does not "
          f"say how much of the task a circuit carries")


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _rows(cfg: ModelConfig, task: tasks.Task, params, batch: tasks.Batch):
  """(clean metric, corrupted metric, clean top-1 token), each [batch].

  The clean and corrupted prompts run as one forward of 2 x batch rows: one program half the size
  of two forwards (it compiles about a quarter faster, on the quickstart's critical path), and the
  same numbers bitwise (each row's arithmetic does not depend on the other rows)."""
  b = batch.clean.shape[0]
  logits = forward(cfg, params, jnp.concatenate([batch.clean, batch.corrupted]),
                   attention_mask=jnp.concatenate([batch.mask, batch.mask]))
  clean, corrupted = logits[:b], logits[b:]  # [batch, pos, vocab] each
  top = jnp.argmax(metrics.last_logits(clean, batch.last), axis=-1)
  return task.metric(clean, batch, clean), task.metric(corrupted, batch, clean), top


def answer_hits(labels: dict[str, np.ndarray], top: np.ndarray) -> np.ndarray | None:
  """bool [N]: whether token `top[i]` is a clean answer of row i by the task's labels (see the
  module docstring); None for labels that name no answer."""
  top = np.asarray(top)
  if "target" in labels:
    return top == np.asarray(labels["target"])
  if "year_ids" in labels and "threshold" in labels:
    years, threshold = np.asarray(labels["year_ids"]), np.asarray(labels["threshold"])
    above = np.arange(years.shape[1])[None, :] > threshold[:, None]
    return ((years == top[:, None]) & above).any(1)
  if "correct" in labels:
    correct = np.asarray(labels["correct"])
    correct = correct[:, None] if correct.ndim == 1 else correct
    return (correct == top[:, None]).any(1)  # sets are padded with -1, never a token
  return None


def _metric_name(task: tasks.Task) -> str:
  base, _, metric = task.name.partition(":")
  if metric:
    return metric
  try:
    return tasks.task_spec(base).default
  except tasks.TaskError:
    return "metric"


def check(cfg: ModelConfig, params, dataset: tasks.Dataset, *, batch_size: int = 16
          ) -> TaskCheck:
  """Run every row's clean and corrupted prompt (see the module docstring). `dataset.task`
  should be the task with its own metric (before `tasks.with_metric`).

  In a multi-process run process p runs batches p, p + N, ... and the rows are gathered in order
  on every process (`distributed.map_split`): one process's result, bitwise. A collective."""
  task = dataset.task

  def one(i, batch):  # process p of N runs batches p, p + N, ... (`distributed.map_split`)
    out = _rows(cfg, task, params, batch)
    valid = np.asarray(batch.valid)
    return dict(zip(("clean", "corrupted", "top"), (np.asarray(x)[valid] for x in out),
                    strict=True))

  parts = distributed.map_split(dataset.batches(batch_size), one)
  clean, corrupted, top = (np.concatenate([p[k] for p in parts])
                           for k in ("clean", "corrupted", "top"))
  return TaskCheck(task.name.split(":")[0], _metric_name(task), task.higher_is_better,
                   clean.astype(np.float64),
                   corrupted.astype(np.float64) if dataset.has_corrupted else None,
                   answer_hits(dataset.labels, top))


def select_rows(dataset: tasks.Dataset, keep: np.ndarray) -> tasks.Dataset:
  """The rows where `keep` (bool [N]) is True, in order, trimmed to their own longest length."""
  idx = np.flatnonzero(keep)
  width = int(dataset.lengths[idx].max())
  return dataclasses.replace(
      dataset, clean=dataset.clean[idx, :width], corrupted=dataset.corrupted[idx, :width],
      lengths=dataset.lengths[idx], labels={k: v[idx] for k, v in dataset.labels.items()},
      read_at=None if dataset.read_at is None else dataset.read_at[idx])


class FilterError(ValueError):
  """A filter that cannot be applied (unknown, no corrupted prompts, no row kept)."""


def apply_filter(dataset: tasks.Dataset, result: TaskCheck, name: str
                 ) -> tuple[tasks.Dataset, TaskCheck]:
  """`name` "none": the data as it is; "correct": only the right rows (clean metric beats
  corrupted), with the check of those rows. FilterError when no row is right."""
  if name not in FILTERS:
    raise FilterError(f"--filter={name}: choose from {', '.join(FILTERS)}")
  if name == "none":
    return dataset, result
  right = result.right
  if right is None:
    raise FilterError("--filter=correct compares each row's clean and corrupted metric: the data "
                      "has no corrupted prompts")
  if not right.any():
    raise FilterError(f"--filter=correct: the model gets none of the {right.size} rows right "
                      f"(clean metric above the corrupted one); nothing is left to attribute")
  kept = dataclasses.replace(
      result, clean=result.clean[right], corrupted=result.corrupted[right],
      top1=None if result.top1 is None else result.top1[right])
  return select_rows(dataset, right), kept


def check_and_filter(cfg: ModelConfig, params, dataset: tasks.Dataset, filter_name: str, *,
                     batch_size: int = 16) -> tuple[tasks.Dataset, dict]:
  """What the pipelines run before attribution or evaluation: `check` (its line printed, and one
  warning line if the model does not do the task and no filter is asked for), then
  `apply_filter` (saying how many rows it kept). Returns the data to use and the summary recorded
  in meta (`TaskCheck.summary` of every row, with `filter` and `n_kept`). InputError for a filter
  that cannot apply."""
  result = check(cfg, params, dataset, batch_size=batch_size)
  print(result.line())
  summary = dict(result.summary(), filter=filter_name)
  if filter_name == "none":
    if result.warning():
      inputs.warn(result.warning())
    return dataset, summary
  try:
    dataset, _ = apply_filter(dataset, result, filter_name)
  except FilterError as e:
    raise inputs.InputError(str(e)) from None
  print(f"--filter={filter_name}: kept the {len(dataset)} of {result.clean.size} rows the model "
        f"gets right (clean metric above the corrupted one)")
  return dataset, dict(summary, n_kept=len(dataset))


def warn_empty(checked: dict, m_full: float, m_empty: float, higher_is_better: bool) -> None:
  """`empty_warning` as one warning line, unless the task check warned already."""
  warning = empty_warning(m_full, m_empty, higher_is_better)
  if warning and (checked["does_task"] or checked["filter"] != "none"):
    inputs.warn(warning)
