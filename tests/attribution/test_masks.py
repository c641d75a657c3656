"""Whole-dataset methods (UGS, edge pruning, ACDC) and optimal ablation on the bundled induction
model.

The known circuit: the previous-token head a0.h3 K-composes into the induction head a1.h0, which
writes the answer (`a0.h3->a1.h0<k>`, `a1.h0->logits`). The training runs are short (a few hundred
steps on 32 examples of 16 tokens) with hyperparameters chosen for that budget, stated per test.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.attribution import acdc, edge_pruning, mask_forward, masks, optimal, ugs
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.groundtruth import toy
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import forward

# CPU-heavy (mask training (UGS, Edge Pruning), optimal ablation and ACDC):
# left out of the default run, run by CI (-m slow).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KNOWN = ("a0.h3->a1.h0<k>", "a1.h0->logits")
SIZES = [5, 10, 15, 20]


@pytest.fixture(scope="module")
def setup():
  model = toy.load_toy()
  data = toy.induction_task_dataset(32, seq_len=8)
  abl = A.make_ablation(model.cfg, model.params, data, "patching", 16)
  eap_ig = A.attribute(model.cfg, model.params, data, method="EAP-IG-inputs", quiet=True).scores
  return model, data, abl, eap_ig


def _faithfulness(model, data, scores):
  return V.faithfulness_curve(model.cfg, model.params, data, scores, n_edges=SIZES,
                              quiet=True).faithfulness


def _ranks(cfg, scores):
  names = [n for n, _ in Graph.from_config(cfg, scores).ranked_edges()]
  return [names.index(e) for e in KNOWN]


def _check_finds_the_circuit(setup, scores):
  """Both known edges in the top 5; the best faithfulness at <= 20 edges at least EAP-IG's."""
  model, data, _, eap_ig = setup
  assert max(_ranks(model.cfg, scores)) < 5, _ranks(model.cfg, scores)
  ours, theirs = _faithfulness(model, data, scores), _faithfulness(model, data, eap_ig)
  assert ours.max() >= theirs.max(), (ours, theirs)
  return ours, theirs


# ------------------------------------------------------------------------------------ bad input


def test_options_refuse_bad_values():
  for make, match in [(lambda: acdc.ACDCOptions(tau=0.0), "tau"),
                      (lambda: acdc.ACDCOptions(tau=-1.0), "tau"),
                      (lambda: acdc.ACDCOptions(acdc_metric="x"), "acdc_metric"),
                      (lambda: edge_pruning.EdgePruningOptions(sparsity=0.0), "sparsity"),
                      (lambda: edge_pruning.EdgePruningOptions(sparsity=-0.5), "sparsity"),
                      (lambda: edge_pruning.EdgePruningOptions(sparsity=1.0), "sparsity"),
                      (lambda: ugs.UGSOptions(reg_lamb=0.0), "reg_lamb"),
                      (lambda: ugs.UGSOptions(mask_steps=0), "mask_steps"),
                      (lambda: ugs.UGSOptions(mask_objective="l2"), "mask_objective"),
                      (lambda: optimal.OptimalOptions(oa_steps=0), "oa_steps"),
                      (lambda: optimal.OptimalOptions(oa_objective="x"), "oa_objective")]:
    with pytest.raises(A.AttributionError, match=match):
      make()


def test_find_circuit_refuses_non_positive_tau_and_sparsity(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for flag in ("--tau=0", "--sparsity=-0.2"):
    r = subprocess.run([sys.executable, "-m", "experiments.find_circuit", flag,
                        f"--out={tmp_path / 'x'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and flag.split("=")[0] in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------------- learned masks


def test_mask_at_one_is_the_clean_model_and_at_zero_the_ablated_one(setup):
  model, data, abl, _ = setup
  cfg, params = model.cfg, model.params
  batch = next(data.batches(8, bucket=None))
  clean_last, ablated = masks.clean_and_ablated(cfg, data.task, params, batch, abl)
  shape = valid_edges(cfg).shape
  key = jax.random.PRNGKey(0)
  on = {"UGS": ugs.sample_masks(key, jnp.full(shape, 30.0), 8),
        "edge-pruning": edge_pruning.sample_z(key, jnp.full(shape, 30.0))}
  off = {"UGS": ugs.sample_masks(key, jnp.full(shape, -30.0), 8),
         "edge-pruning": edge_pruning.sample_z(key, jnp.full(shape, -30.0))}
  values = abl.values(cfg, params, batch)  # the graph form's ablated senders
  run = jax.jit(lambda tokens, w: forward(cfg, params, tokens, attention_mask=batch.mask,
                                           edges=None if w is None else EdgePatch(w, values)))
  loss = jax.jit(masks.circuit_loss, static_argnums=(0, 1, 2))
  corrupted_last = np.take_along_axis(run(batch.corrupted, None), batch.last[:, None, None], axis=1)
  for name in on:
    assert np.all(np.asarray(on[name]) == 1) and np.all(np.asarray(off[name]) == 0), name
    kl_on = loss(cfg, data.task, "kl", params, batch, clean_last, ablated, on[name])
    np.testing.assert_allclose(kl_on, 0.0, atol=1e-5)
    # All edges ablated to the corrupted run: exactly the corrupted model's output.
    w = off[name] if off[name].ndim == 2 else off[name][0]
    logits = run(batch.clean, w)
    np.testing.assert_allclose(np.take_along_axis(logits, batch.last[:, None, None], axis=1),
                               corrupted_last, atol=1e-4)
    # ... and so in the mask methods' scanned forward.
    np.testing.assert_allclose(mask_forward.last_logits(cfg, params, ablated, w), corrupted_last,
                               atol=1e-4)
  assert float(edge_pruning.keep_probability(jnp.asarray(30.0))) == pytest.approx(1.0)
  assert float(edge_pruning.keep_probability(jnp.asarray(-30.0))) == pytest.approx(0.0)


def test_sparsity_schedule(setup):
  model, data, abl, _ = setup
  opts = edge_pruning.EdgePruningOptions(sparsity=0.6, start_sparsity=0.1, mask_steps=24,
                                         mask_batch=8)
  w = edge_pruning.warmup_steps(opts)
  assert w == 20  # 5/6 of the steps, as the reference's 2500 of 3000
  targets = [float(edge_pruning.target_sparsity(k, opts)) for k in (0, w // 2, w, w + 3)]
  np.testing.assert_allclose(targets, [0.1, 0.35, 0.6, 0.6], atol=1e-6)
  res = edge_pruning.fit(model.cfg, model.params, data, abl, opts)
  # The target each training step used: linear from start_sparsity to sparsity, then flat.
  np.testing.assert_allclose(res.extras["target"], np.minimum(0.1 + 0.5 * np.arange(24) / 20, 0.6),
                             atol=1e-6)
  assert res.extras["circuit"].sum() == round(0.4 * valid_edges(model.cfg).sum())
  assert np.all((res.scores >= 0) & (res.scores <= 1))
  assert len(res.extras["lambda_1"]) == 24 and np.all(res.extras["lambda_2"] >= 0)


# ----------------------------------------------------------------------- the known circuit, each


@pytest.mark.slow
def test_ugs_finds_the_induction_circuit(setup):
  # MIB's UGS uses reg_lamb = 0.001 over ~2000 steps; in 300 steps a stronger penalty and learning
  # rate separate the circuit from the rest.
  model, data, abl, _ = setup
  opts = ugs.UGSOptions(mask_steps=300, mask_batch=8, ugs_samples=2, mask_lr=0.1, reg_lamb=0.1)
  res = ugs.fit(model.cfg, model.params, data, abl, opts)
  assert np.all((res.scores >= 0) & (res.scores <= 1))
  _check_finds_the_circuit(setup, res.scores)


@pytest.mark.slow
def test_edge_pruning_finds_the_induction_circuit(setup):
  # The reference's hyperparameters (learning rate 0.8, log_alpha from 10, its schedule) over 1000
  # steps instead of 3000, to 20 edges of 110.
  model, data, abl, _ = setup
  opts = edge_pruning.EdgePruningOptions(sparsity=0.82, mask_steps=1000, mask_batch=16, seed=1)
  res = edge_pruning.fit(model.cfg, model.params, data, abl, opts)
  # Its circuit (the 20 edges most likely kept) holds the known one and is at least as faithful as
  # EAP-IG's best at <= 20 edges. Its scores are keep probabilities, several edges' near 1, so the
  # known edges' ranks inside the circuit are near-ties (6th and 5th at this seed, 2nd and 1st at
  # seed 0): no top-5 check here.
  assert res.extras["circuit"].sum() == 20
  circuit = Graph.from_config(model.cfg).with_edges(res.extras["circuit"])
  names = {circuit.edge_name(s, r) for s, r in zip(*np.nonzero(circuit.in_graph), strict=True)}
  assert set(KNOWN) <= names, sorted(names)
  ours, theirs = _faithfulness(model, data, res.scores), _faithfulness(model, data, setup[3])
  assert ours.max() >= theirs.max(), (ours, theirs)
  # The Lagrangian holds the sampled masks' sparsity at the target once it stops rising.
  assert abs(np.mean(res.extras["sparsity"][-100:]) - 0.82) < 0.03


def test_acdc_finds_the_induction_circuit(setup):
  model, data, abl, _ = setup
  res = A.attribute(model.cfg, model.params, data, method="ACDC", ablation=abl, quiet=True,
                    options=acdc.ACDCOptions(tau=0.01))
  circuit = Graph.from_config(model.cfg).with_edges(res.extras["circuit"])
  names = {circuit.edge_name(s, r) for s, r in zip(*np.nonzero(circuit.in_graph), strict=True)}
  assert set(KNOWN) <= names, sorted(names)
  assert max(_ranks(model.cfg, res.scores)) < 5
  # The kept edges are exactly those whose removal raised KL by tau or more.
  tried = res.scores != 0
  assert np.all(res.scores[res.extras["circuit"]] >= 0.01)
  assert np.all(res.scores[tried & ~res.extras["circuit"]] < 0.01)
  faith = (V.evaluate_circuits(model.cfg, model.params, data,
                               res.extras["circuit"].astype(np.float32), ablation=abl, quiet=True)
           - V.baselines(model.cfg, model.params, data, ablation=abl)[1])
  assert faith > 0


# ---------------------------------------------------------------------------- optimal ablation


def test_optimal_ablation_beats_mean_ablation_and_round_trips(setup, tmp_path):
  model, data, _, _ = setup
  cfg, params = model.cfg, model.params
  small = data.subset(8)
  means = np.asarray(A.compute_means(cfg, params, small, 8))
  opts = optimal.OptimalOptions(oa_steps=15, oa_lr=1e-2, oa_batch=8, oa_patience=0)
  values, info = optimal.learn_optimal_values(cfg, params, small, means, opts)
  before = optimal.ablation_losses(cfg, params, small, means, batch_size=8)
  after = optimal.ablation_losses(cfg, params, small, values, batch_size=8)
  assert info["steps"] == 15 and after.mean() < before.mean()
  assert np.mean(after <= before + 1e-6) >= 0.8, (before, after)
  optimal.save_values(str(tmp_path / "oa"), values, {"note": "test"})
  loaded, meta = optimal.load_values(str(tmp_path / "oa"), cfg)
  np.testing.assert_array_equal(loaded, values)
  assert meta == {"note": "test"}
  abl = A.make_ablation(cfg, params, small, "optimal", 8, optimal_values=str(tmp_path / "oa"))
  batch = next(small.batches(4))
  vals = abl.values(cfg, params, batch)
  assert abl.kind == "optimal" and vals.shape == (4, batch.clean.shape[1]) + values.shape
  np.testing.assert_allclose(np.asarray(vals[1, 3]), values, rtol=1e-6)
  with pytest.raises(A.AttributionError, match="not a directory of optimal-ablation values"):
    optimal.load_values(str(tmp_path))
