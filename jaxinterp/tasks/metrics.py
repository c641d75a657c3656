"""Per-example task metrics, read at each example's last real token.

Every metric takes the model's logits `Float[Array, "batch pos vocab"]` and `last: Int[Array,
"batch"]` (the index of each example's last real token; prompts are right padded, so it varies per
example) and returns one value per example, `Float[Array, "batch"]`. They are pure `jax.numpy`, so
`jax.jit`, `jax.grad` and `jax.vmap` apply directly. Reduce over a batch with `masked_mean(values,
batch.valid)` so that filler rows of the final batch do not count.

Conventions follow the EAP-IG reference (`hannamw/EAP-IG`, `eap-ig-faithfulness/metrics.py`), with
the reference's `mean=False, loss=False` (per-example, in the metric's own units, larger = more of
the behaviour):

* `logit_diff`: `logit[correct] - logit[incorrect]`. Answer sets (`[batch, k]`, padded with -1) are
  averaged: mean logit over the correct set minus mean logit over the incorrect set (the reference's
  SVA logit convention).
* `prob_diff`: greater-than. With `p = softmax(logits)` over the full vocabulary and `year_ids` the
  100 token ids of "00".."99": `sum(p[year_ids[YY+1:]]) - sum(p[year_ids[:YY+1]])`, YY =
  `threshold`.
* `set_prob_diff`: `sum(p[correct set]) - sum(p[incorrect set])` (the reference's hypernymy metric).
* `kl_divergence`: `KL(clean || patched) = sum_v p_clean (log p_clean - log p)`. The reference
  divides this sum by the vocabulary size (it uses `kl_div(...).mean(-1)`); `vocab_mean=True` does
  the same.
* `js_divergence`: `JS = (KL(p || m) + KL(p_clean || m)) / 2` with `m = (p + p_clean) / 2`;
  `vocab_mean=True` averages each KL over the vocabulary, as the reference's `js_div` does.
* `year_logit_diff`: greater-than with logits: mean logit of the years > YY minus the mean logit of
  the years <= YY (the reference's `prob=False` branch).
* `set_logit_sum_diff`: `sum(logit[correct set]) - sum(logit[incorrect set])` (the reference's
  hypernymy `prob=False` branch sums logits).
* `cross_entropy`: `-log p[target]`; `log_prob` is its negation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward, last_token_logits
from jaxinterp.tasks.data import Batch, Task

Array = jax.Array


def last_logits(logits: Array, last: Array) -> Array:
  """The logits at each example's last real token.

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"], index of each example's last real token.

  Returns:
    Float[Array, "batch vocab"].
  """
  last = jnp.asarray(last, jnp.int32)
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]


def _as_set(ids: Array) -> Array:
  """Answer ids as Int[Array, "batch k"]: a [batch] vector becomes a one-element set."""
  ids = jnp.asarray(ids)
  return ids[:, None] if ids.ndim == 1 else ids


def _gather_set(values: Array, ids: Array):
  """values [batch, vocab], ids [batch, k] (-1 = padding) -> (gathered [batch, k], valid [batch,
  k])."""
  ids = _as_set(ids)
  valid = ids >= 0
  got = jnp.take_along_axis(values, jnp.where(valid, ids, 0).astype(jnp.int32), axis=-1)
  return got, valid


def _set_mean(values: Array, ids: Array) -> Array:
  got, valid = _gather_set(values, ids)
  n = jnp.maximum(valid.sum(-1), 1)
  return jnp.where(valid, got, 0.0).sum(-1) / n


def _set_sum(values: Array, ids: Array) -> Array:
  got, valid = _gather_set(values, ids)
  return jnp.where(valid, got, 0.0).sum(-1)


def logit_diff(logits: Array, last: Array, correct: Array, incorrect: Array) -> Array:
  """Logit difference at the last real token: `logit[correct] - logit[incorrect]`.

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"].
    correct: Int[Array, "batch"] answer ids, or Int[Array, "batch k"] answer sets padded with -1.
    incorrect: same forms as `correct` (its own k).

  Returns:
    Float[Array, "batch"]; for sets, the mean logit over each set's ids.
  """
  lg = last_logits(logits, last)
  return _set_mean(lg, correct) - _set_mean(lg, incorrect)


def prob_diff(logits: Array, last: Array, year_ids: Array, threshold: Array) -> Array:
  """Greater-than probability difference: p(years > YY) - p(years <= YY).

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"].
    year_ids: Int[Array, "100"] (or "batch 100"), the token id of each two-digit year "00".."99".
    threshold: Int[Array, "batch"], YY (0..99), the start year's last two digits.

  Returns:
    Float[Array, "batch"], with probabilities softmaxed over the full vocabulary.
  """
  p = jax.nn.softmax(last_logits(logits, last), axis=-1)
  year_ids = jnp.asarray(year_ids, jnp.int32)
  if year_ids.ndim == 1:
    py = p[:, year_ids]
  else:
    py = jnp.take_along_axis(p, year_ids, axis=-1)
  years = jnp.arange(py.shape[-1])
  above = years[None, :] > jnp.asarray(threshold)[:, None]
  return jnp.where(above, py, 0.0).sum(-1) - jnp.where(above, 0.0, py).sum(-1)


def set_prob_diff(logits: Array, last: Array, correct: Array, incorrect: Array) -> Array:
  """Summed-probability difference between two answer sets: `sum p[correct] - sum p[incorrect]`.

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"].
    correct, incorrect: Int[Array, "batch"] or Int[Array, "batch k"] padded with -1.

  Returns:
    Float[Array, "batch"] (softmax over the full vocabulary).
  """
  p = jax.nn.softmax(last_logits(logits, last), axis=-1)
  return _set_sum(p, correct) - _set_sum(p, incorrect)


def log_prob(logits: Array, last: Array, target: Array) -> Array:
  """Log-probability of `target` (Int[Array, "batch"]) at the last real token -> Float[Array,
  "batch"]."""
  lp = jax.nn.log_softmax(last_logits(logits, last), axis=-1)
  return jnp.take_along_axis(lp, jnp.asarray(target, jnp.int32)[:, None], axis=-1)[:, 0]


def cross_entropy(logits: Array, last: Array, target: Array) -> Array:
  """Cross-entropy `-log p[target]` at the last real token -> Float[Array, "batch"]."""
  return -log_prob(logits, last, target)


def kl_divergence(logits: Array, clean_logits: Array, last: Array,
                  vocab_mean: bool = False) -> Array:
  """KL(clean || patched) at the last real token, in nats.

  Args:
    logits: Float[Array, "batch pos vocab"], the patched (or circuit) run.
    clean_logits: Float[Array, "batch pos vocab"], the clean run (treated as the target
    distribution). last: Int[Array, "batch"].
    vocab_mean: divide by the vocabulary size, as the EAP-IG reference (`kl_div(...).mean(-1)`)
    does.

  Returns:
    Float[Array, "batch"], `sum_v p_clean (log p_clean - log p)` >= 0 (over |V| with `vocab_mean`).
  """
  lp = jax.nn.log_softmax(last_logits(logits, last), axis=-1)
  lq = jax.nn.log_softmax(last_logits(clean_logits, last), axis=-1)
  terms = jnp.exp(lq) * (lq - lp)
  return jnp.mean(terms, axis=-1) if vocab_mean else jnp.sum(terms, axis=-1)


def js_divergence(logits: Array, clean_logits: Array, last: Array,
                  vocab_mean: bool = False) -> Array:
  """Jensen-Shannon divergence between the patched and the clean next-token distributions.

  Args:
    logits: Float[Array, "batch pos vocab"], the patched (or circuit) run.
    clean_logits: Float[Array, "batch pos vocab"], the clean run.
    last: Int[Array, "batch"].
    vocab_mean: average each KL term over the vocabulary, as the reference's `js_div` does.

  Returns:
    Float[Array, "batch"], `(KL(p || m) + KL(p_clean || m)) / 2` with `m = (p + p_clean) / 2`.
  """
  lp = jax.nn.log_softmax(last_logits(logits, last), axis=-1)
  lq = jax.nn.log_softmax(last_logits(clean_logits, last), axis=-1)
  lm = jnp.logaddexp(lp, lq) - jnp.log(2.0)
  reduce = jnp.mean if vocab_mean else jnp.sum
  return 0.5 * (reduce(jnp.exp(lp) * (lp - lm), axis=-1) + reduce(jnp.exp(lq) * (lq - lm), axis=-1))


def year_logit_diff(logits: Array, last: Array, year_ids: Array, threshold: Array) -> Array:
  """Greater-than with logits: mean logit of the years > YY minus mean logit of the years <= YY.

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"].
    year_ids: Int[Array, "100"] (or "batch 100"), the token ids of "00".."99".
    threshold: Int[Array, "batch"], YY.

  Returns:
    Float[Array, "batch"]. An empty side (YY = 99) contributes 0 (the reference's mean of nothing is
    NaN).
  """
  lg = last_logits(logits, last)
  year_ids = jnp.asarray(year_ids, jnp.int32)
  ly = lg[:, year_ids] if year_ids.ndim == 1 else jnp.take_along_axis(lg, year_ids, axis=-1)
  above = jnp.arange(ly.shape[-1])[None, :] > jnp.asarray(threshold)[:, None]
  n_above = above.sum(-1)
  n_below = ly.shape[-1] - n_above
  mean_above = jnp.where(above, ly, 0.0).sum(-1) / jnp.maximum(n_above, 1)
  mean_below = jnp.where(above, 0.0, ly).sum(-1) / jnp.maximum(n_below, 1)
  return mean_above - mean_below


def set_logit_sum_diff(logits: Array, last: Array, correct: Array, incorrect: Array) -> Array:
  """Summed-logit difference between two answer sets: `sum logit[correct] - sum logit[incorrect]`.

  Args:
    logits: Float[Array, "batch pos vocab"].
    last: Int[Array, "batch"].
    correct, incorrect: Int[Array, "batch"] or Int[Array, "batch k"] padded with -1.

  Returns:
    Float[Array, "batch"] (the reference's hypernymy metric with `prob=False`).
  """
  lg = last_logits(logits, last)
  return _set_sum(lg, correct) - _set_sum(lg, incorrect)


def masked_mean(values: Array, valid: Array | None = None) -> Array:
  """Mean of per-example `values` over rows where `valid` is True (all rows if None)."""
  if valid is None:
    return jnp.mean(values)
  w = jnp.asarray(valid, values.dtype)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


# ------------------------------------------------------------------------------------------------
# The task's metric on a batch


def metric_sum(task: Task, logits: Array, batch: Batch, clean_logits: Array | None) -> Array:
  """Sum of the per-example metric over the batch's real (valid) rows, and the per-example values.
  """
  values = task.metric(logits, batch, clean_logits)
  return jnp.sum(jnp.where(batch.valid, values, 0.0)), values


def metric_at_last(cfg: ModelConfig, task: Task, params, batch: Batch, x: Array,
                   clean_logits: Array | None):
  """`metric_sum` from the final-norm output x, unembedding only each example's last real position
  (`clean_logits`, if the task reads them, are last-position logits too: [batch, 1, vocab])."""
  logits = last_token_logits(cfg, params, x, batch.last)
  return metric_sum(task, logits, batch.replace(last=jnp.zeros_like(batch.last)), clean_logits)


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def clean_metric(cfg: ModelConfig, task: Task, params, batch: Batch):
  """The clean model on a batch: (sum over real rows, Float[Array, "batch"] values, logits)."""
  logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  total, values = metric_sum(task, logits, batch, logits)
  return total, values, logits
