"""The answers of a dataset against the model: `answer_sets` (the distinct answers a task's labels
name) and `rarely_predicted_answers` (those the model never ranks near the top), the binaries'
check that the labels were tokenised as the model predicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.tasks.data import Dataset


def answer_sets(dataset: Dataset) -> list[tuple[int, ...]]:
  """The distinct answers of a dataset, each the tuple of ids that count as it (one id, or a set's
  members), from its `correct` or `target` labels; empty for tasks without answer tokens
  (greater-than)."""
  for key in ("correct", "target"):
    if key in dataset.labels:
      ids = np.asarray(dataset.labels[key]).reshape(len(dataset), -1)
      return sorted({tuple(int(i) for i in row if i >= 0) for row in ids} - {()})
  return []


def rarely_predicted_answers(cfg: ModelConfig, params, dataset: Dataset, *, k: int = 50,
                             max_examples: int = 64, batch_size: int = 16) -> list[tuple[int, ...]]:
  """Answers (see `answer_sets`) none of whose ids is in any prompt's top-k next tokens, over the
  first `max_examples` prompts.

  A cheap check of the data against the model: an answer the model never ranks highly (e.g. `A`
  where the model predicts `A` with a space) usually means the labels were tokenised differently
  from the model's own predictions, and the metric then measures noise.
  """
  answers = answer_sets(dataset)
  if not answers:
    return []
  data = dataset.subset(min(len(dataset), max_examples))
  k = max(1, min(k, cfg.d_vocab))
  top = jax.jit(lambda p, b: jax.lax.top_k(
      jnp.take_along_axis(forward(cfg, p, b.clean, attention_mask=b.mask),
                          b.last[:, None, None].astype(jnp.int32), axis=1)[:, 0], k)[1])
  seen = set()
  for batch in data.batches(batch_size):  # filler rows repeat a real one: harmless here
    seen.update(np.asarray(top(params, batch)).ravel().tolist())
  return [a for a in answers if not seen.intersection(a)]
