"""Activation-patching sweeps (vmapped), and the pipelines of the evaluate_circuit and
activation_patching binaries (`report.evaluate_circuit`, `pipeline.activation_patching`)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxinterp import models, patching, tasks
from jaxinterp.circuits import Graph
from jaxinterp.evaluation import faithfulness as evaluation
from jaxinterp.evaluation import report
from jaxinterp.experiments import cli
from jaxinterp.patching import pipeline
from jaxinterp.runtime import inputs

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


HALF = 8  # the pipelines generate make_induction(n, 8, ...): same shapes, compiled sweeps reused
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
  np.testing.assert_allclose(r.normalized, (r.metric - m_corrupt) / (m_clean - m_corrupt),
                             rtol=1e-6)
  if sweep == "resid_pre":
    # Where every row's clean and corrupted tokens agree (BOS, and the uncorrupted half), the
    # layer-0 residual is the same in both runs, so patching it changes nothing (normalised 1). BOS
    # stays equal in every layer (attention is causal).
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


# ---------------------------------------------------------------------------------------- pipelines


def test_activation_patching(model_dir, tmp_path, capsys):
  out = tmp_path / "patching"
  config = pipeline.PatchingConfig(model=model_dir, n_examples=BATCH, batch_size=BATCH,
                                   sweeps="resid_pre,head_out")
  results = pipeline.activation_patching(config, str(out))
  for name in ("resid_pre", "head_out"):
    with open(out / f"{name}.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    z = np.load(out / f"{name}.npz")
    assert z["normalized"].shape[0] == CFG.n_layers and np.isfinite(z["normalized"]).all()
    assert str(z["sweep"]) == name
    np.testing.assert_array_equal(z["normalized"], results[name].normalized)
  meta = json.loads((out / "patching.json").read_text())
  assert meta["n_examples"] == 4 and set(meta["sweeps"]) == {"resid_pre", "head_out"}
  assert meta["config"] == dataclasses.asdict(config)
  assert "strongest cell" in capsys.readouterr().out

  # A finished run is kept: the same settings report it complete, others are refused.
  before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  assert pipeline.activation_patching(config, str(out)) == {}
  assert "already holds this activation_patching run" in capsys.readouterr().out
  other = dataclasses.replace(config, sweeps="resid_pre")
  with pytest.raises(inputs.InputError, match="with other settings .*--overwrite"):
    pipeline.activation_patching(other, str(out))
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
  assert set(pipeline.activation_patching(other, str(out), overwrite=True)) == {"resid_pre"}
  assert not (out / "head_out.npz").exists()  # the old run's other outputs are gone


def test_activation_patching_errors(model_dir, tmp_path):
  out = tmp_path / "bad"
  cases = [(dict(model=model_dir, sweeps="resid_pre,nope"), "nope"),
           (dict(model=model_dir, sweeps=" , "), "--sweeps is empty"),
           (dict(model=model_dir, direction="both"), "--direction=both: choose from"),
           (dict(model=model_dir, patch_chunk=0), "--patch_chunk=0: must be at least 1"),
           (dict(model=str(tmp_path / "no_such_model")), "not a directory"),
           (dict(model=model_dir, task="ioi"), "--data")]
  for kw, message in cases:
    with pytest.raises(inputs.InputError, match=message):
      pipeline.activation_patching(pipeline.PatchingConfig(**kw), str(out))
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


def test_evaluate_circuit(model_dir, tmp_path, capsys):
  ours, other, _, g = _graph_files(tmp_path)
  out = tmp_path / "eval"
  config = report.EvaluateConfig(model=model_dir, graph=str(ours), compare=str(other),
                                 n_examples=4, batch_size=4)
  summary = report.evaluate_circuit(config, str(out))
  rep = json.loads((out / "evaluation.json").read_text())
  assert rep == json.loads(json.dumps(summary))
  assert rep["n_edges"] == Graph.from_json(str(ours), cfg=CFG).count_edges()
  assert rep["n_edges_total"] == g.n_edges
  f = (rep["metric_circuit"] - rep["metric_empty"]) / (rep["metric_full"] - rep["metric_empty"])
  assert rep["faithfulness"] == pytest.approx(f)
  assert 0.0 <= rep["compare"]["edge_iou"] <= 1.0 and 0.0 <= rep["compare"]["node_iou"] <= 1.0
  assert len(rep["curve"]) == 10
  assert rep["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
  mib = evaluation.mib_scores(CFG, models.from_pretrained(model_dir).params, data4(), g_in(ours),
                              batch_size=4, score_convention="loss")  # a file's scores
  assert rep["CPR"] == mib["CPR"] and rep["CMD"] == mib["CMD"]
  rows = (out / "faithfulness.csv").read_text().strip().splitlines()
  assert rows[0].split(",")[:2] == ["n_edges", "n_edges_kept"] and len(rows) == 11
  for png in ("faithfulness.png", "circuit.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "faithfulness" in capsys.readouterr().out

  # top_n re-selects: the whole graph is the full model (faithfulness 1); a graph equal to itself
  # overlaps completely.
  out2 = tmp_path / "eval2"
  config = dataclasses.replace(config, compare=str(ours), top_n=g.n_edges)
  rep2 = report.evaluate_circuit(config, str(out2))
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
      (dict(graph=str(ours), data=str(tmp_path / "none.csv"), task="ioi"),
       "none.csv: no such file"),
      (dict(graph=str(ours), n_examples=0), "--n_examples=0: must be at least 1"),
      (dict(graph=str(ours), batch_size=0), "--batch_size=0: must be at least 1"),
      (dict(graph=str(ours), top_n=-1), "--top_n=-1: must be at least 0"),
      (dict(graph=str(ours), intervention="nope"), "--intervention=nope: choose from patching"),
      (dict(graph=str(ours), metric="nope"), "--metric=nope: choose from"),
      (dict(), "--graph is required"),
  ]
  for kw, msg in cases:
    config = report.EvaluateConfig(**{"model": model_dir, "n_examples": 2, "batch_size": 2, **kw})
    with pytest.raises(inputs.InputError, match=msg):
      report.evaluate_circuit(config, str(out))
  assert not out.exists()


def test_flag_helpers():
  cli.define("string", "model", "something-else", "redefinition is a no-op")
  cli.define("integer", "patch_chunk", 32, "a flag of the activation_patching binary")
  with flagsaver.flagsaver():
    FLAGS["model"].value, FLAGS["model"].using_default_value = "x", True
    assert cli.value("model", "toy") == "toy"  # unset: the binary's own default
    # A config takes each field from the flag of its name, else the field's default.
    assert cli.config(pipeline.PatchingConfig) == pipeline.PatchingConfig()
  with flagsaver.flagsaver(model="given", patch_chunk=8):
    assert cli.value("model", "toy") == "given"
    assert cli.config(pipeline.PatchingConfig, seed=3) == pipeline.PatchingConfig(
        model="given", patch_chunk=8, seed=3)
  assert cli.defaults(pipeline.PatchingConfig)["patch_chunk"] == 32
