"""Activation-patching sweeps (vmapped) and the evaluate_circuit / activation_patching binaries."""

import json

import jax
import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from jaxinterp import models
from jaxinterp.experiments import activation_patching, cli, evaluate_circuit
from jaxinterp import patching, tasks
from jaxinterp.evaluation import faithfulness as evaluation
from jaxinterp.circuits import Graph

FLAGS = flags.FLAGS
CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=40, n_ctx=24, bos_token_id=0)


@pytest.fixture(scope="module", autouse=True)
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(["test"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  # Larger weights than the default init, so patching single components has visible effects.
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)
  out = tmp_path_factory.mktemp("tiny_model")
  models.save_converted(models.Model(CFG, params, None, None), str(out))
  return str(out)


@pytest.fixture(scope="module")
def model(model_dir):
  return models.from_pretrained(model_dir)


HALF = 8  # the binaries generate make_induction(n, 8, ...): same shapes, so compiled sweeps are reused
BATCH = 4


@pytest.fixture(scope="module")
def data():
  return tasks.make_induction(BATCH, HALF, CFG.d_vocab, seed=3, bos_id=0)


@pytest.fixture(scope="module")
def sweeps(model, data):
  out = {(s, "noising"): patching.run_sweep(model.cfg, model.params, data, s, batch_size=BATCH,
                                            quiet=True)
         for s in ("resid_pre", "head_out", "head_pattern")}
  out["resid_pre", "denoising"] = patching.run_sweep(model.cfg, model.params, data, "resid_pre",
                                                     direction="denoising", batch_size=BATCH,
                                                     quiet=True)
  return out


# ------------------------------------------------------------------------------------------ sweeps


@pytest.mark.parametrize("sweep,cells", [
    ("resid_pre", [(0, (12,)), (1, (15,)), (1, (9,))]),
    ("head_out", [(0, (1,)), (1, (0,))]),
    ("head_pattern", [(1, (1,)), (0, (0,))]),
])
def test_sweep_matches_single_patches(model, data, sweeps, sweep, cells):
  """Every checked cell of the vmapped sweep equals a plain forward with that one patch."""
  r = sweeps[sweep, "noising"]
  P, H = data.clean.shape[1], CFG.n_heads
  assert r.metric.shape == ((2, P) if sweep == "resid_pre" else (2, H))
  m_clean, m_corrupt = patching.baselines(model.cfg, model.params, data, batch_size=BATCH)
  np.testing.assert_allclose([r.m_clean, r.m_corrupted], [m_clean, m_corrupt], rtol=1e-5)
  for layer, idx in cells:
    want = patching.patched_metric(model.cfg, model.params, data, sweep, layer, idx,
                                   batch_size=BATCH)
    np.testing.assert_allclose(r.metric[(layer,) + idx], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r.normalized, (r.metric - m_corrupt) / (m_clean - m_corrupt), rtol=1e-6)
  if sweep == "resid_pre":
    # Where every row's clean and corrupted tokens agree (BOS, and the uncorrupted half), the layer-0
    # residual is the same in both runs, so patching it changes nothing (normalised 1). BOS stays
    # equal in every layer (attention is causal).
    same = np.all(data.clean == data.corrupted, axis=0)
    assert same[0] and 1 < same.sum() < same.size
    np.testing.assert_allclose(r.normalized[0, same], 1.0, atol=1e-4)
    np.testing.assert_allclose(r.normalized[:, 0], 1.0, atol=1e-4)
    assert not np.allclose(r.normalized, 1.0, atol=1e-3)


def test_sweep_chunking(model, data, sweeps):
  """Odd chunk sizes (a padded last chunk) give the same grid."""
  r = patching.run_sweep(model.cfg, model.params, data, "head_out", batch_size=BATCH, chunk=3,
                         quiet=True)
  np.testing.assert_allclose(r.metric, sweeps["head_out", "noising"].metric, rtol=1e-5, atol=1e-6)


def test_endpoints(model, data, sweeps):
  """Noising resid_pre of layer 0 at every position is the corrupted run; denoising is the clean."""
  P = data.clean.shape[1]
  m_clean, m_corrupt = patching.baselines(model.cfg, model.params, data, batch_size=BATCH)
  assert abs(m_clean - m_corrupt) > 1e-3
  every = (list(range(P)),)
  noised = patching.patched_metric(model.cfg, model.params, data, "resid_pre", 0, every,
                                   batch_size=BATCH)
  denoised = patching.patched_metric(model.cfg, model.params, data, "resid_pre", 0, every,
                                     direction="denoising", batch_size=BATCH)
  np.testing.assert_allclose(noised, m_corrupt, rtol=1e-5)
  np.testing.assert_allclose(denoised, m_clean, rtol=1e-5)
  # Denoising sweep: BOS is the same in both prompts, so restoring it restores nothing (0); a cell
  # equals the single patched forward.
  r = sweeps["resid_pre", "denoising"]
  np.testing.assert_allclose(r.normalized[:, 0], 0.0, atol=1e-5)
  want = patching.patched_metric(model.cfg, model.params, data, "resid_pre", 1, (P - 1,),
                                 direction="denoising", batch_size=BATCH)
  np.testing.assert_allclose(r.metric[1, P - 1], want, rtol=1e-4)


def test_sweep_errors(model, data):
  with pytest.raises(patching.PatchingError, match="unknown sweep"):
    patching.run_sweep(model.cfg, model.params, data, "resid_post")
  with pytest.raises(patching.PatchingError, match="direction"):
    patching.run_sweep(model.cfg, model.params, data, "resid_pre", direction="both")
  same = tasks.Dataset(data.task, data.clean, data.clean.copy(), data.lengths, data.labels)
  with pytest.raises(patching.PatchingError, match="same mean metric"):
    patching.run_sweep(model.cfg, model.params, same, "mlp_out", batch_size=BATCH, quiet=True)


# ---------------------------------------------------------------------------------------- binaries


def test_activation_patching_binary(model_dir, tmp_path, capsys):
  out = tmp_path / "patching"
  with flagsaver.flagsaver(model=model_dir, n_examples=BATCH, batch_size=BATCH, out=str(out),
                           sweeps="resid_pre,head_out"):
    activation_patching.main(["prog"])
  for name in ("resid_pre", "head_out"):
    with open(out / f"{name}.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    z = np.load(out / f"{name}.npz")
    assert z["normalized"].shape[0] == CFG.n_layers and np.isfinite(z["normalized"]).all()
    assert str(z["sweep"]) == name
  meta = json.loads((out / "patching.json").read_text())
  assert meta["n_examples"] == 4 and set(meta["sweeps"]) == {"resid_pre", "head_out"}
  assert "strongest cell" in capsys.readouterr().out


def test_activation_patching_errors(model_dir, tmp_path):
  out = tmp_path / "bad"
  with flagsaver.flagsaver(model=model_dir, out=str(out), sweeps="resid_pre,nope"):
    with pytest.raises(app.UsageError, match="nope"):
      activation_patching.main(["prog"])
  with flagsaver.flagsaver(model=str(tmp_path / "no_such_model"), out=str(out)):
    with pytest.raises(app.UsageError, match="not a directory"):
      activation_patching.main(["prog"])
  with flagsaver.flagsaver(model=model_dir, out=str(out), task="ioi"):
    with pytest.raises(app.UsageError, match="--data"):
      activation_patching.main(["prog"])
  assert not out.exists()


def _graph_files(tmp_path):
  rng = np.random.default_rng(0)
  g = Graph.from_config(CFG, rng.normal(size=Graph.from_config(CFG).valid.shape))
  ours = tmp_path / "graph.json"
  g.top_n(12).to_json(str(ours))
  other = tmp_path / "other.json"
  Graph.from_config(CFG, rng.normal(size=g.valid.shape)).top_n(12).to_json(str(other))
  wrong_cfg = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=4, d_head=4,
                                 d_mlp=32, d_vocab=40, n_ctx=24)
  wrong = tmp_path / "wrong.json"
  Graph.from_config(wrong_cfg).full().to_json(str(wrong))
  return ours, other, wrong, g


def data4():
  """The data the binaries generate for the tiny model with --n_examples=4."""
  return tasks.make_induction(4, HALF, CFG.d_vocab, 0, bos_id=0)


def g_in(path):
  return Graph.from_json(str(path), cfg=CFG).scores


def test_evaluate_circuit_binary(model_dir, tmp_path, capsys):
  ours, other, _, g = _graph_files(tmp_path)
  out = tmp_path / "eval"
  with flagsaver.flagsaver(model=model_dir, graph=str(ours), compare=str(other), n_examples=4,
                           batch_size=4, out=str(out)):
    evaluate_circuit.main(["prog"])
  rep = json.loads((out / "evaluation.json").read_text())
  assert rep["n_edges"] == Graph.from_json(str(ours), cfg=CFG).count_edges()
  assert rep["n_edges_total"] == g.n_edges
  f = (rep["metric_circuit"] - rep["metric_empty"]) / (rep["metric_full"] - rep["metric_empty"])
  assert rep["faithfulness"] == pytest.approx(f)
  assert 0.0 <= rep["compare"]["edge_iou"] <= 1.0 and 0.0 <= rep["compare"]["node_iou"] <= 1.0
  assert len(rep["curve"]) == 10 and rep["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
  mib = evaluation.mib_scores(CFG, models.from_pretrained(model_dir).params, data4(), g_in(ours),
                              batch_size=4, score_convention="loss")  # a file's scores
  assert rep["CPR"] == pytest.approx(mib["CPR"], rel=1e-5, abs=1e-6)
  assert rep["CMD"] == pytest.approx(mib["CMD"], rel=1e-5, abs=1e-6)
  rows = (out / "faithfulness.csv").read_text().strip().splitlines()
  assert rows[0].split(",")[:2] == ["n_edges", "n_edges_kept"] and len(rows) == 11
  for png in ("faithfulness.png", "circuit.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "faithfulness" in capsys.readouterr().out

  # --top_n re-selects: the whole graph is the full model (faithfulness 1); a graph equal to itself
  # overlaps completely.
  out2 = tmp_path / "eval2"
  with flagsaver.flagsaver(model=model_dir, graph=str(ours), compare=str(ours), n_examples=4,
                           batch_size=4, out=str(out2), top_n=g.n_edges):
    evaluate_circuit.main(["prog"])
  rep2 = json.loads((out2 / "evaluation.json").read_text())
  assert rep2["n_edges"] == g.n_edges and rep2["faithfulness"] == pytest.approx(1.0, abs=1e-4)
  assert rep2["compare"]["edge_iou"] == 1.0


def test_evaluate_circuit_errors(model_dir, tmp_path):
  ours, _, wrong, _ = _graph_files(tmp_path)
  out = tmp_path / "bad"
  bad_json = tmp_path / "bad.json"
  bad_json.write_text("{not json")
  cases = [
      (dict(graph=str(tmp_path / "missing.json")), "no such file"),
      (dict(graph=str(wrong)), "does not match the model"),
      (dict(graph=str(bad_json)), "not valid JSON"),
      (dict(graph=str(ours), compare=str(wrong)), "--compare"),
      (dict(graph=str(ours), data=str(tmp_path / "none.csv"), task="ioi"), "none.csv: no such file"),
  ]
  for kw, msg in cases:
    with flagsaver.flagsaver(model=model_dir, out=str(out), n_examples=2, batch_size=2, **kw):
      with pytest.raises(app.UsageError, match=msg):
        evaluate_circuit.main(["prog"])
  with flagsaver.flagsaver(model=model_dir, out=str(out), n_examples=0, graph=str(ours)):
    with pytest.raises(app.UsageError, match="n_examples"):
      evaluate_circuit.main(["prog"])
  with flagsaver.flagsaver(model=model_dir, out=str(out)):
    FLAGS["graph"].value, FLAGS["graph"].using_default_value = None, True
    with pytest.raises(app.UsageError, match="--graph is required"):
      evaluate_circuit.main(["prog"])
  assert not out.exists()


def test_flag_helpers():
  cli.define("string", "model", "something-else", "redefinition is a no-op")
  with flagsaver.flagsaver():
    FLAGS["model"].value, FLAGS["model"].using_default_value = "x", True
    assert cli.value("model", "toy") == "toy"  # unset: the binary's own default
  with flagsaver.flagsaver(model="given"):
    assert cli.value("model", "toy") == "given"
