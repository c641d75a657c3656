"""Running only each row's suffix after the clean/corrupted shared prefix changes no number."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models.transformer import embed_inputs, run_blocks
from jaxinterp.runtime import shared_prefix
from tests.attribution.test_receiver_grads import CONFIGS, _params


def late_corruption(cfg, n=10, width=16, seed=0, metric="task"):
  """Random prompts of 10..width tokens whose corrupted version differs in two tokens from a random
  position >= 4 on, so that clean and corrupted share a prefix of a different length per row."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(10, width + 1, n).astype(np.int32)
  clean = rng.integers(1, cfg.d_vocab, (n, width)).astype(np.int32)
  clean[:, 0] = 0
  corrupted = clean.copy()
  for i in range(n):
    s = rng.integers(4, lengths[i] - 1)
    corrupted[i, s:s + 2] = rng.integers(1, cfg.d_vocab, 2)
  real = np.arange(width)[None] < lengths[:, None]
  labels = {"target": rng.integers(1, cfg.d_vocab, n).astype(np.int32)}
  task = tasks.with_metric(tasks.get_task("induction"), metric)
  return tasks.Dataset(task=task, clean=np.where(real, clean, 0),
                       corrupted=np.where(real, corrupted, 0), lengths=lengths, labels=labels,
                       pad_id=0, bos_id=0)


def test_plan():
  cfg = CONFIGS["gpt2"]
  data = late_corruption(cfg)
  plans = [shared_prefix.plan(cfg, b, "patching") for b in data.batches(4)]
  assert plans == [None, 8, 8]  # the first batch's widest suffix leaves nothing to gain
  batch = next(iter(data.batches(4)))
  assert shared_prefix.plan(cfg, batch, "mean") is None  # only the corrupted run shares the prefix
  bidirectional = dataclasses.replace(cfg, causal=False)
  assert all(shared_prefix.plan(bidirectional, b, "patching") is None for b in data.batches(4))
  induction = tasks.make_induction(4, 6, cfg.d_vocab, bos_id=0)  # differs from position 1
  assert shared_prefix.plan(cfg, next(iter(induction.batches(4))), "patching") is None


def test_suffix_positions_and_gathers():
  cfg = CONFIGS["gpt2"]
  batch = list(late_corruption(cfg).batches(4))[1]
  sfx = shared_prefix.Suffix.of(batch, 8)
  clean, corrupted = np.asarray(batch.clean), np.asarray(batch.corrupted)
  last = np.asarray(batch.last)
  for i in range(4):
    start = int(sfx.start[i])
    assert np.all(clean[i, :start] == corrupted[i, :start]) and (
        clean[i, start] != corrupted[i, start] or start == last[i])
    n = last[i] - start + 1
    assert list(np.asarray(sfx.mask[i])) == [True] * n + [False] * (8 - n)
    assert list(np.asarray(sfx.positions[i])) == list(range(start, start + 8))
  cut = sfx.batch(batch)
  np.testing.assert_array_equal(np.asarray(cut.last), last - np.asarray(sfx.start))
  for i in range(4):
    real = np.asarray(sfx.mask[i])
    np.testing.assert_array_equal(np.asarray(cut.clean[i])[real],
                                  clean[i, int(sfx.start[i]):last[i] + 1])
  x = jnp.arange(2 * 4 * 16 * 3).reshape(2, 4, 16, 3)  # [layer, batch, pos, d]
  np.testing.assert_array_equal(np.asarray(sfx.take(x, axis=2))[:, :, :, 0] // 3 % 16,
                                np.minimum(np.asarray(sfx.positions), 15)[None].repeat(2, 0))


@pytest.mark.parametrize("family", [pytest.param("gpt2", marks=pytest.mark.slow),
                                    pytest.param("gpt_neox", marks=pytest.mark.slow),
                                    pytest.param("llama", marks=pytest.mark.slow), "gemma2"])
def test_blocks_after_a_prefix_equal_the_whole_run(family):
  """run_blocks on each row's suffix, attending to the whole run's keys and values before it
  (rotary, GQA, sliding windows, softcaps), gives the whole run's activations at those positions."""
  cfg = CONFIGS[family]
  params = _params(cfg)
  batch = list(late_corruption(cfg).batches(4))[1]
  sfx = shared_prefix.Suffix.of(batch, 8)
  names = ("attn.hook_k", "attn.hook_v", "hook_resid_post")

  @jax.jit
  def both(params, batch):
    emb = embed_inputs(cfg, params, batch.clean, batch.mask)
    final, ys = run_blocks(cfg, params, emb, batch.mask, collect=names)
    part, ys_s = run_blocks(cfg, params, sfx.take(emb), sfx.mask, collect=("hook_resid_post",),
                            positions=sfx.positions, prefix=sfx.prefix(ys[names[0]], ys[names[1]]))
    return final, ys, part, ys_s

  final, ys, part, ys_s = both(params, batch)
  real = np.asarray(sfx.mask)
  want = np.asarray(sfx.take(ys["hook_resid_post"], axis=2))
  np.testing.assert_allclose(np.asarray(ys_s["hook_resid_post"])[:, real], want[:, real],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(part)[real], np.asarray(sfx.take(final))[real],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,method", [
    ("gpt2", "EAP-IG-inputs"), pytest.param("gpt2", "EAP", marks=pytest.mark.slow),
    pytest.param("gpt_neox", "EAP-IG-inputs", marks=pytest.mark.slow),
    pytest.param("llama", "EAP-IG-inputs", marks=pytest.mark.slow),
    pytest.param("gemma2", "EAP-IG-inputs", marks=pytest.mark.slow)])
def test_attribution_kernel_on_suffixes_equals_the_whole_run(family, method):
  """EAP / EAP-IG-inputs scores, metric and clean metric from the suffixes equal the kernel's on
  every position (itself tested against the weight-gradient definition)."""
  cfg = CONFIGS[family]
  params = _params(cfg)
  data = late_corruption(cfg)
  batch = list(data.batches(4))[1]
  width = shared_prefix.plan(cfg, batch, "patching")
  assert width == 8 < batch.clean.shape[1]
  alphas = jnp.asarray([1.0] if method == "EAP" else A.ig_alphas(3), jnp.float32)
  abl = A.Patching()
  ref = RG.ig_inputs_batch(cfg, data.task, params, batch, abl, alphas)
  got = RG.ig_inputs_batch(cfg, data.task, params, batch, abl, alphas, suffix=width)
  valid = valid_edges(cfg)
  s_ref, s_got = np.asarray(ref[0])[valid], np.asarray(got[0])[valid]
  assert np.abs(s_ref).max() > 1e-2
  np.testing.assert_allclose(s_got, s_ref, atol=1e-5 * np.abs(s_ref).max(), rtol=1e-4)
  for r, g in zip(ref[1:], got[1:], strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_attribute_uses_the_suffix_and_matches_the_reference():
  """`attribute` takes the suffix path where it gains, and its scores equal the weight-gradient
  reference kernel's, batch by batch, with a metric that reads the clean logits (KL)."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  data = late_corruption(cfg, metric="kl")
  got = A.attribute(cfg, params, data, method="EAP-IG-inputs", ig_steps=3, batch_size=4,
                    quiet=True).scores
  alphas = jnp.asarray(A.ig_alphas(3), jnp.float32)
  ref = sum(np.asarray(A.eap.weight_gradient_batch(cfg, data.task, params, b,
                                                   A.Patching(), alphas)[0], np.float64)
            for b in data.batches(4)) / len(data)
  valid = valid_edges(cfg)
  assert np.abs(ref[valid]).max() > 1e-3
  np.testing.assert_allclose(got[valid], ref[valid], atol=2e-4 * np.abs(ref[valid]).max(),
                             rtol=1e-3)


@pytest.mark.parametrize("family,level", [
    pytest.param("llama", "edge", marks=pytest.mark.slow),  # the fast suite's CPU budget
    pytest.param("gpt2", "node", marks=pytest.mark.slow),
    pytest.param("gpt_neox", "edge", marks=pytest.mark.slow),
    pytest.param("gemma2", "edge", marks=pytest.mark.slow),
    pytest.param("gemma2", "node", marks=pytest.mark.slow)])
def test_exact_patching_on_suffixes_equals_the_whole_run(family, level, monkeypatch):
  """Exact patching reruns each row's suffix only, after the clean keys and values (GQA's
  ungrouped, Gemma-2's sliding windows), and its scores equal the reruns of every position."""
  cfg = CONFIGS[family]
  params = _params(cfg)
  data = late_corruption(cfg, n=8)
  batches = list(data.batches(4))
  assert [A.exact.suffix(cfg, b, A.Patching())[1].clean.shape[1]
          for b in batches] == [16, 8]  # the first batch runs every position, the second a suffix

  def run():
    return A.attribute(cfg, params, data, method="exact", batch_size=4, level=level,
                       quiet=True)

  got = run()
  monkeypatch.setattr(shared_prefix, "plan", lambda *a: None)
  ref = run()
  scored = valid_edges(cfg) if level == "edge" else np.ones(ref.scores.shape, bool)
  assert np.abs(ref.scores[scored]).max() > 1e-2
  np.testing.assert_allclose(got.scores[scored], ref.scores[scored],
                             atol=1e-5 * np.abs(ref.scores[scored]).max(), rtol=1e-4)
  np.testing.assert_allclose(got.clean_metric, ref.clean_metric, rtol=1e-6)
