"""Bootstrap stability of attribution scores: `attribute(..., bootstrap=B)`.

The driver keeps each batch's score sums (`Progress.batch_sums`, one array of the scores' shape per
batch) and its number of real examples. A resample draws the batches with replacement (counts
c ~ Multinomial(n_batches, uniform)) and its scores are `finalize(sum_j c_j S_j / sum_j c_j n_j)`,
the same average the full run takes. So resampling costs one small matrix product per resample and
no model call, whatever the method.

The resampling unit is the batch (a block bootstrap): with `batch_size=1` it is the classic
bootstrap over examples; with larger batches the variance of the mean is still estimated without
bias for exchangeable examples, but from fewer units, so use small batches (or many examples) when
the figures matter; `summary` reports the number of units.

Per entry (edge, node or neuron) it reports the standard deviation of the score over the resamples
and the fraction of resamples whose score has the sign of the full-data score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK = 32  # resamples finalised at a time (bounds the memory to CHUNK copies of the scores)


def resample(batch_sums: np.ndarray, batch_counts: np.ndarray, resamples: int, seed: int = 0,
             finalize: Callable[[np.ndarray], np.ndarray] | None = None):
  """Bootstrap the batch-level score sums.

  Args:
    batch_sums: Float[ndarray, "batch ..."], each batch's summed scores.
    batch_counts: Int[ndarray, "batch"], real examples per batch.
    resamples: B, the number of resamples (>= 2).
    seed: seed of the resampling (numpy's PCG64).
    finalize: maps a mean-score array to the final scores (identity if None).

  Returns:
    (std, sign_fraction): float32 arrays of the final scores' shape.
  """
  fin = finalize or (lambda x: x)
  sums = np.asarray(batch_sums, np.float64)
  counts = np.asarray(batch_counts, np.float64)
  n = sums.shape[0]
  flat = sums.reshape(n, -1)
  full = np.asarray(fin((flat.sum(0) / counts.sum()).reshape(sums.shape[1:])), np.float64)
  sign = np.sign(full)
  rng = np.random.default_rng(seed)
  total = np.zeros(full.shape)
  total_sq = np.zeros(full.shape)
  same = np.zeros(full.shape)
  done = 0
  while done < resamples:
    k = min(CHUNK, resamples - done)
    c = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)  # [k, n]
    means = (c @ flat) / np.maximum(c @ counts, 1.0)[:, None]
    for row in means:
      s = np.asarray(fin(row.reshape(sums.shape[1:])), np.float64)
      total += s
      total_sq += s * s
      same += np.sign(s) == sign
    done += k
  mean = total / resamples
  var = np.maximum(total_sq / resamples - mean * mean, 0.0) * resamples / max(resamples - 1, 1)
  return np.sqrt(var).astype(np.float32), (same / resamples).astype(np.float32)


def summary(scores: np.ndarray, std: np.ndarray, sign_fraction: np.ndarray, valid: np.ndarray,
            selected: np.ndarray | None = None) -> dict:
  """A JSON-ready summary of bootstrap figures over the `valid` entries (and the `selected` ones,
  e.g. a circuit's edges, if given): sign stability and the relative spread."""
  def stats(mask: np.ndarray) -> dict:
    if not mask.any():
      return {"count": 0}
    f, sd, s = sign_fraction[mask], std[mask], np.abs(scores[mask])
    rel = sd / np.maximum(s, 1e-12)
    return {"count": int(mask.sum()), "mean_sign_fraction": float(f.mean()),
            "min_sign_fraction": float(f.min()),
            "fraction_sign_stable_95": float((f >= 0.95).mean()),
            "median_std": float(np.median(sd)), "median_relative_std": float(np.median(rel))}

  out = {"all": stats(valid)}
  if selected is not None:
    out["selected"] = stats(valid & selected)
  return out
