"""DAS training: orthogonality, frozen model, IIA on the shipped toy, causal models, save/load, the
subspace-illusion diagnostic."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxinterp import interventions as I
from jaxinterp import models
from jaxinterp.interventions import InterventionError, Where, illusion, saving
from jaxinterp.interventions import toy_task as T
from jaxinterp.interventions import training as tr
from jaxinterp.interventions.causal_model import CausalModel
from jaxinterp.runtime import inputs

HAS_TOY = os.path.exists(os.path.join(T.ASSET_DIR, "jaxinterp_config.json"))
needs_toy = pytest.mark.skipif(not HAS_TOY, reason="jaxinterp/assets/das_toy not built "
                               "(python -m experiments.train_das --retrain_model)")


@pytest.fixture(scope="module")
def toy():
  model, meta = T.load_das_toy()
  p = meta["p"]
  return (model.cfg, model.params, p, T.interchange_data(p, 2048, seed=1),
          T.interchange_data(p, 512, seed=2))


CFG = models.ModelConfig(family="gpt2", d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16,
                         d_vocab=7, n_ctx=4)


def small_data(n=64, seed=0):
  r = np.random.RandomState(seed)
  base = r.randint(0, 7, (n, 3)).astype(np.int32)
  src = r.randint(0, 7, (n, 3)).astype(np.int32)
  return {"base": base, "source": src, "label": src[:, 0]}


@pytest.mark.parametrize("kind", ["cayley", "qr", "lowrank"])
def test_orthogonal_after_training_and_model_frozen(kind):
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  before = jax.tree.map(np.array, params)
  key = jax.random.PRNGKey(1)
  site = "blocks.0.hook_resid_post"
  if kind == "lowrank":
    tmpl = {site: tr.init_low_rank(key, 8, 3, where=Where.of(positions=2))}
  else:
    tmpl = {site: tr.init_rotated_space(key, 8, 3, param=kind, where=Where.of(positions=2))}
  opt = optax.adam(5e-2)
  tp = tr.trainable_params(tmpl)
  state = opt.init(tp)
  step = tr.make_train_step(CFG, opt)
  data = small_data()
  losses = []
  for _ in range(25):
    tp, state, loss, _ = step(tp, state, tmpl, params, data)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  trained = tr.merge_params(tmpl, tp)
  M = np.asarray(trained[site].matrix(), np.float64)
  raw0 = np.asarray(tr.trainable_params(tmpl)[site][I.RotatedSpace.trainable[0] if kind != "lowrank"
                                                    else "basis"])
  assert not np.allclose(raw0, np.asarray(tp[site]["basis" if kind == "lowrank" else "rotation"]))
  assert np.linalg.norm(M.T @ M - np.eye(M.shape[1])) < 1e-5
  # the model's params are untouched (they are never differentiated nor returned)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))


def test_boundless_trains_boundary_with_annealing():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  site = "blocks.0.hook_resid_post"
  tmpl = {site: tr.init_boundless(jax.random.PRNGKey(2), 8, boundary=0.5, temperature=5.0,
                                  where=Where.of(positions=2))}
  trained, hist = tr.train_interventions(CFG, params, tmpl, small_data(), steps=12, batch_size=32,
                                         learning_rate=5e-2, temperature=lambda i: 5.0 - 0.3 * i,
                                         eval_data=small_data(32, 1))
  iv = trained[site]
  assert float(iv.temperature) == pytest.approx(5.0 - 0.3 * 11)
  assert float(iv.boundary) != pytest.approx(0.5)
  R = np.asarray(iv.matrix(), np.float64)
  assert np.linalg.norm(R.T @ R - np.eye(8)) < 1e-5
  assert 0.0 <= hist["iia"] <= 1.0


def test_batch_errors():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  tmpl = {"blocks.0.hook_resid_post": tr.init_rotated_space(jax.random.PRNGKey(0), 8, 2)}
  with pytest.raises(InterventionError, match="missing 'label'"):
    tr.iia(CFG, params, tmpl, {"base": np.zeros((2, 3), np.int32),
                               "source": np.zeros((2, 3), np.int32)})
  with pytest.raises(InterventionError, match="no source tokens"):
    tr.iia(CFG, params, tmpl, {"base": np.zeros((2, 3), np.int32), "label": np.zeros(2, np.int32),
                               "source": {"other": np.zeros((2, 3), np.int32)}})
  with pytest.raises(InterventionError, match="no trainable"):
    tr.trainable_params({"x": I.Zero()})


def test_causal_model():
  p = 5
  cm = T.causal_model(p)
  assert cm.run({"a": 2, "b": 4})["O"] == 1
  assert cm.counterfactual({"a": 2, "b": 4}, {"a": 1, "b": 1}, ["S"]) == 2
  assert cm.counterfactual({"a": 2, "b": 4}, {"a": 1, "b": 1}, ["a"]) == 0
  d = T.interchange_data(p, 50, seed=0)
  want = (d["source"][:, 0] + d["source"][:, 1]) % p
  np.testing.assert_array_equal(d["label"], want)
  with pytest.raises(InterventionError, match="cycle"):
    CausalModel(["a"], {"X": (lambda y: y, ["Y"]), "Y": (lambda x: x, ["X"])}, "X")
  with pytest.raises(InterventionError, match="unknown causal"):
    cm.run({"a": 1, "b": 1}, {"Q": 1})


@needs_toy
def test_shipped_toy_model_solves_task(toy):
  cfg, params, p, _, _ = toy
  toks = T.all_inputs(p)
  pred = np.argmax(models.forward(cfg, params, toks)[:, -1], -1)
  assert (pred == (toks[:, 0] + toks[:, 1]) % p).mean() >= 0.99


@needs_toy
def test_das_on_shipped_toy_finds_the_known_site(toy):
  cfg, params, p, train, held = toy
  right = T.das_at(cfg, params, "blocks.1.hook_resid_pre", 2, train, k=8, steps=150)
  assert tr.iia(cfg, params, right, held) >= 0.9
  wrong = T.das_at(cfg, params, "blocks.1.hook_resid_pre", 1, train, k=8, steps=40)
  assert tr.iia(cfg, params, wrong, held) < 1.0 / p + 0.1


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_save_load_round_trip(tmp_path):
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(3)
  We = np.asarray(jax.random.normal(key, (8, 5)))
  ivs = {
      "blocks.0.hook_resid_post": tr.init_rotated_space(key, 8, 3,
                                                        where=Where.of(positions=(1, 2))),
      "blocks.0.hook_resid_pre": tr.init_boundless(key, 8, boundary=0.3, temperature=2.0),
      "blocks.0.mlp.hook_post": tr.init_low_rank(key, 16, 2,
                                                 where=I.WhereEach(jnp.array([0, 1, 2, 1]))),
      "blocks.0.attn.hook_z": I.SigmoidMask(jnp.arange(4.0), temperature=jnp.float32(0.5),
                                            where=Where.of(heads=1)),
      "blocks.0.hook_attn_out": I.Chain((I.Add(jnp.ones(8), 2.0), I.Autoencoder.jumprelu(
          We, np.zeros(5), We.T, np.zeros(8), np.full(5, 0.1), latent_scale=np.float32(0.5),
          keep_error=True))),
  }
  saving.save_interventions(str(tmp_path / "ivs"), ivs, metadata={"note": "round trip"})
  spec = json.load(open(tmp_path / "ivs" / saving.SPEC_FILE))
  assert spec["sites"]["blocks.0.hook_resid_post"]["type"] == "RotatedSpace"
  assert spec["sites"]["blocks.0.hook_resid_post"]["static"]["k"] == 3
  loaded, meta = saving.load_interventions(str(tmp_path / "ivs"))
  assert meta == {"note": "round trip"}
  assert list(loaded) == list(ivs)
  for site in ivs:
    assert type(loaded[site]) is type(ivs[site])
    a = jax.tree_util.tree_flatten_with_path(ivs[site])
    b = jax.tree_util.tree_flatten_with_path(loaded[site])
    assert a[1] == b[1]  # same structure, including static fields such as k, param, where
    for x, y in zip(a[0], b[0], strict=True):
      np.testing.assert_array_equal(np.asarray(x[1], np.float32), np.asarray(y[1], np.float32))
  base, src = small_data(4)["base"], small_data(4, 1)["source"]
  sources = {s: src for s in ivs}
  out1, _ = I.run(CFG, params, base, ivs, sources=sources)
  out2, _ = I.run(CFG, params, base, loaded, sources=sources)
  np.testing.assert_allclose(out1, out2, atol=1e-6)
  with pytest.raises(InterventionError, match="not found"):
    saving.load_interventions(str(tmp_path / "nothing"))


def test_split_row_null():
  r = np.random.RandomState(0)
  W = r.randn(6, 3).astype(np.float32)
  v = r.randn(6).astype(np.float32)
  vr, vn = illusion.split_row_null(v, W)
  np.testing.assert_allclose(np.asarray(vr + vn), v, atol=1e-6)
  np.testing.assert_allclose(np.asarray(vn @ W), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(vr @ W), v @ W, atol=1e-5)
  assert abs(float(vr @ vn)) < 1e-5


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_illusion_report_null_direction_has_no_effect():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  site = "blocks.0.mlp.hook_post"
  W = np.asarray(illusion.downstream_weights(CFG, params, site))
  assert W.shape == (16, 8)
  d = small_data(16)

  def metric(lg):
    return lg[:, -1, 0] - lg[:, -1, 1]

  r = np.random.RandomState(1)
  vr, vn = illusion.split_row_null(r.randn(16).astype(np.float32), W)
  rep_null = illusion.illusion_report(CFG, params, site, vn, d["base"], d["source"], metric,
                                      where=Where.of(positions=2))
  assert rep_null["row_fraction"] < 1e-6
  assert abs(rep_null["effect_full"]) < 1e-5 and abs(rep_null["effect_null"]) < 1e-5
  rep_row = illusion.illusion_report(CFG, params, site, vr, d["base"], d["source"], metric,
                                     where=Where.of(positions=2))
  assert rep_row["row_fraction"] == pytest.approx(1.0, abs=1e-5)
  assert abs(rep_row["effect_full"]) > 1e-4
  assert rep_row["surviving"] == pytest.approx(1.0, abs=1e-3)
  with pytest.raises(InterventionError, match="pass W explicitly"):
    illusion.downstream_weights(CFG, params, "blocks.0.hook_resid_pre")


@pytest.mark.slow
def test_train_das_end_to_end(tmp_path, capsys):
  """`toy_task.train_das` (the train_das binary's pipeline) on the shipped toy, with a small budget:
  the outputs parse."""
  out = tmp_path / "das"
  res = T.train_das(T.DASConfig(das_steps=30, n_train=256, n_eval=128), str(out))
  assert json.load(open(out / "iia.json")) == json.loads(json.dumps(res))
  assert "illusion" in res and res["model_accuracy"] > 0.99
  rows = open(out / "iia.csv").read().splitlines()
  assert rows[0] == "site,position,k,iia" and len(rows) == 10
  with open(out / "das_iia.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "blocks.1.hook_resid_pre pos 2: IIA" in capsys.readouterr().out


def test_train_das_checks_its_config_before_training(tmp_path):
  for config, message in [(T.DASConfig(das_steps=0), "--das_steps=0: must be at least 1"),
                          (T.DASConfig(k=33), "--k=33: must be between 1 and the model width 32"),
                          (T.DASConfig(model_lr=0.0), "--model_lr=0.0: must be positive"),
                          (T.DASConfig(p=1), "--p=1: must be at least 2")]:
    with pytest.raises(inputs.InputError, match=message):
      T.train_das(config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
