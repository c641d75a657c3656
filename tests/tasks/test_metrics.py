"""Metrics against hand-computed numpy values, plus jit/grad behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.tasks import metrics

B, P, V = 4, 6, 11


@pytest.fixture
def logits():
  return np.random.default_rng(0).normal(size=(B, P, V)).astype(np.float32) * 2.0


@pytest.fixture
def last():
  return np.array([5, 2, 0, 3], np.int32)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_last_logits_picks_each_examples_last_token(logits, last):
  got = np.asarray(metrics.last_logits(logits, last))
  np.testing.assert_array_equal(got, logits[np.arange(B), last])


def test_logit_diff_single_ids(logits, last):
  correct, incorrect = np.array([1, 2, 3, 4]), np.array([0, 5, 6, 10])
  want = np.array([logits[b, last[b], correct[b]] - logits[b, last[b], incorrect[b]]
                   for b in range(B)])
  got = metrics.logit_diff(logits, last, correct, incorrect)
  assert got.shape == (B,)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_logit_diff_sets_average_and_ignore_padding(logits, last):
  correct = np.array([[1, 2, -1], [3, -1, -1], [4, 5, 6], [7, 8, -1]])
  incorrect = np.array([[0, -1], [9, 10], [2, -1], [1, 3]])
  want = []
  for b in range(B):
    row = logits[b, last[b]]
    c = [i for i in correct[b] if i >= 0]
    w = [i for i in incorrect[b] if i >= 0]
    want.append(np.mean(row[c]) - np.mean(row[w]))
  np.testing.assert_allclose(metrics.logit_diff(logits, last, correct, incorrect), want, rtol=1e-5)
  # a [batch] vector and a [batch, 1] set are the same thing
  one = np.array([1, 2, 3, 4])
  np.testing.assert_allclose(metrics.logit_diff(logits, last, one, incorrect),
                             metrics.logit_diff(logits, last, one[:, None], incorrect), rtol=1e-6)


def test_prob_diff_greater_than(logits, last):
  year_ids = np.array([10, 3, 7, 1, 0, 9, 2])  # 7 "years" (ids in the 11-token vocab)
  threshold = np.array([0, 3, 6, 2])
  want = []
  for b in range(B):
    p = _np_softmax(logits[b, last[b]].astype(np.float64))
    py = p[year_ids]
    want.append(py[threshold[b] + 1:].sum() - py[:threshold[b] + 1].sum())
  got = metrics.prob_diff(logits, last, year_ids, threshold)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # per-row year ids (the loader's layout) give the same values
  tiled = np.tile(year_ids, (B, 1))
  np.testing.assert_allclose(metrics.prob_diff(logits, last, tiled, threshold), got, rtol=1e-6)


def test_prob_diff_all_mass_on_one_year():
  lg = np.full((1, 1, 5), -1e9, np.float32)
  lg[0, 0, 4] = 0.0  # all probability on token 4 = year 2 of year_ids [0, 2, 4, 1, 3]
  year_ids = np.array([0, 2, 4, 1, 3])
  assert float(metrics.prob_diff(lg, np.array([0]), year_ids, np.array([1]))[0]) == pytest.approx(
      1.0)
  assert float(metrics.prob_diff(lg, np.array([0]), year_ids, np.array([2]))[0]) == pytest.approx(
      -1.0)


def test_set_prob_diff(logits, last):
  correct = np.array([[1, 2], [3, -1], [4, 5], [0, -1]])
  incorrect = np.array([[0, -1], [9, 10], [2, -1], [1, 3]])
  want = []
  for b in range(B):
    p = _np_softmax(logits[b, last[b]].astype(np.float64))
    want.append(p[[i for i in correct[b] if i >= 0]].sum()
                - p[[i for i in incorrect[b] if i >= 0]].sum())
  np.testing.assert_allclose(metrics.set_prob_diff(logits, last, correct, incorrect), want,
                             rtol=1e-5, atol=1e-7)


def test_cross_entropy_and_log_prob(logits, last):
  target = np.array([0, 4, 10, 7])
  want = np.array([-np.log(_np_softmax(logits[b, last[b]].astype(np.float64))[target[b]])
                   for b in range(B)])
  np.testing.assert_allclose(metrics.cross_entropy(logits, last, target), want, rtol=1e-5)
  np.testing.assert_allclose(metrics.log_prob(logits, last, target), -want, rtol=1e-5)


def test_kl_divergence(logits, last):
  clean = np.random.default_rng(1).normal(size=(B, P, V)).astype(np.float32)
  want = []
  for b in range(B):
    q = _np_softmax(clean[b, last[b]].astype(np.float64))
    p = _np_softmax(logits[b, last[b]].astype(np.float64))
    want.append(np.sum(q * (np.log(q) - np.log(p))))
  got = metrics.kl_divergence(logits, clean, last)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert np.all(np.asarray(got) > 0)
  np.testing.assert_allclose(metrics.kl_divergence(clean, clean, last), 0.0, atol=1e-6)


def test_metrics_ignore_positions_after_last(logits, last):
  """Changing padded positions (after each example's last token) changes nothing."""
  changed = logits.copy()
  for b in range(B):
    changed[b, last[b] + 1:] += 100.0
  c, w = np.array([1, 2, 3, 4]), np.array([0, 5, 6, 10])
  np.testing.assert_array_equal(metrics.logit_diff(logits, last, c, w),
                                metrics.logit_diff(changed, last, c, w))


def test_jit_and_grad(logits, last):
  correct, incorrect = jnp.array([1, 2, 3, 4]), jnp.array([0, 5, 6, 10])
  f = jax.jit(lambda lg: metrics.logit_diff(lg, last, correct, incorrect).sum())
  g = np.asarray(jax.grad(f)(jnp.asarray(logits)))
  want = np.zeros_like(logits)
  for b in range(B):
    want[b, last[b], correct[b]] += 1
    want[b, last[b], incorrect[b]] -= 1
  np.testing.assert_array_equal(g, want)
  # every metric differentiates to finite values
  for fn in (lambda lg: metrics.prob_diff(lg, last, jnp.arange(5), jnp.array([1, 2, 3, 0])),
             lambda lg: metrics.kl_divergence(lg, jnp.asarray(logits) * 0.5, last),
             lambda lg: metrics.cross_entropy(lg, last, correct)):
    gr = jax.jit(jax.grad(lambda lg, fn=fn: fn(lg).sum()))(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(gr)))


def test_masked_mean():
  v = jnp.array([1.0, 2.0, 3.0, 100.0])
  assert float(metrics.masked_mean(v, jnp.array([True, True, True, False]))) == pytest.approx(2.0)
  assert float(metrics.masked_mean(v)) == pytest.approx(26.5)
  assert float(metrics.masked_mean(v, jnp.zeros(4, bool))) == 0.0
