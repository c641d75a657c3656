"""EAP-IG-activations on the receiver-gradient kernel gives the scores of its definition (the
graph-form weight gradients, `ig_activations.weight_gradient_batch`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.attribution import ig_activations as IA
from jaxinterp.attribution import receiver_grads as RG
from tests.attribution.test_receiver_grads import CONFIGS, _params, check_kernel

CASES = [pytest.param("gpt2", "patching", False, id="gpt2"),
         pytest.param("gpt2", "patching", True, id="gpt2-remat"),
         pytest.param("gpt_neox", "patching", False, id="gpt_neox", marks=pytest.mark.slow),
         pytest.param("llama", "patching", False, id="llama", marks=pytest.mark.slow),
         pytest.param("llama", "patching", True, id="llama-remat", marks=pytest.mark.slow),
         pytest.param("gemma2", "patching", False, id="gemma2", marks=pytest.mark.slow),
         pytest.param("gemma2", "patching", True, id="gemma2-remat", marks=pytest.mark.slow),
         pytest.param("gpt2", "mean", False, id="gpt2-mean", marks=pytest.mark.slow),
         pytest.param("llama", "mean", True, id="llama-mean-remat", marks=pytest.mark.slow),
         pytest.param("gpt2", "zero", False, id="gpt2-zero", marks=pytest.mark.slow),
         pytest.param("gpt2", "zero", True, id="gpt2-zero-remat", marks=pytest.mark.slow),
         pytest.param("gpt_neox", "zero", False, id="gpt_neox-zero", marks=pytest.mark.slow),
         pytest.param("llama", "mean", False, id="llama-mean", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,intervention,remat", CASES)
def test_kernel_matches_the_weight_gradients(family, intervention, remat):
  """Every family (parallel blocks, GQA, post-norms), patching, zero and mean ablations (whose layer
  nodes start from their ablated values), and the rematerialised (per-head-input) form: scores to
  float rounding, the last step's metric values and the clean ones."""
  cfg = CONFIGS[family]
  params = _params(cfg)
  ds = tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(8))  # 2 filler rows: they must not count
  abl = A.Patching()
  if intervention == "mean":
    abl = A.Mean(A.compute_means(cfg, params, ds, 4))
  elif intervention == "zero":
    abl = A.Zero()
  alphas = jnp.asarray(A.ig_alphas(3, eap_start=1), jnp.float32)
  check_kernel(cfg, ds.task, params, batch,
               IA.weight_gradient_batch(cfg, ds.task, params, batch, abl, alphas),
               RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas, remat=remat,
                                  interpolate="activations"))


def test_layer_nodes_are_not_the_inputs():
  """Interpolating the layer nodes is not interpolating the inputs: the two kernels' scores differ
  on the same batch (so the test above can't pass by running EAP-IG-inputs)."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  ds = tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(8))
  alphas = jnp.asarray(A.ig_alphas(3, eap_start=1), jnp.float32)
  abl = A.Patching()
  acts, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas,
                                  interpolate="activations")
  inputs, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas)
  acts, inputs = np.asarray(acts), np.asarray(inputs)
  assert np.abs(acts - inputs).max() > 0.05 * np.abs(acts).max()


def test_no_suffix_and_known_interpolations():
  cfg = CONFIGS["gpt2"]
  ds = tasks.make_induction(2, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(2))
  alphas = jnp.asarray([1.0], jnp.float32)
  for kw in (dict(interpolate="activations", suffix=3), dict(interpolate="outputs")):
    with pytest.raises(ValueError, match="interpolate="):
      RG.ig_inputs_batch(cfg, ds.task, _params(cfg), batch, A.Patching(), alphas, **kw)


@pytest.mark.slow
def test_ablations_other_than_patching_do_not_read_the_corrupted_prompts():
  """Under zero and mean ablation each layer node starts from its ablated value, not from the
  corrupted run (the `eap` package's zero ablation; tests/attribution/test_eap_package.py): other
  corrupted prompts give the same scores, and a dataset without them is accepted."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  ds = tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(8))
  other = batch.replace(corrupted=(batch.corrupted + 1) % cfg.d_vocab)
  alphas = jnp.asarray(A.ig_alphas(2, eap_start=1), jnp.float32)
  for abl in (A.Zero(), A.Mean(A.compute_means(cfg, params, ds, 4))):
    a, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas,
                                 interpolate="activations")
    b, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, other, abl, alphas,
                                 interpolate="activations")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not A.get_method("EAP-IG-activations").needs_corrupted
