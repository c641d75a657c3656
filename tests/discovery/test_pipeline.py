"""find_circuit end to end: the library pipeline's outputs, determinism and errors; the binary's
flags, exit codes and one-line errors; refusal of mismatched checkpoints, SIGKILL + resume."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxinterp import circuits as G
from jaxinterp import models
from jaxinterp.circuits import Graph
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.runtime import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  cfg = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                           d_vocab=40, n_ctx=32, bos_token_id=0)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  path = str(tmp_path_factory.mktemp("tiny"))
  models.save_converted(models.Model(cfg, params), path)
  return path


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.find_circuit"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, **kw)


def _flags(model, out, method="EAP-IG-inputs", **extra):
  flags = {"model": model, "out": out, "method": method, "n_examples": 8, "batch_size": 4,
           "top_n": 10}
  flags.update(extra)
  return [f"--{k}={v}" for k, v in flags.items()]


def _config(model, method="EAP-IG-inputs", **extra):
  """A small run of the library pipeline, as flax's train_test.py shrinks its config."""
  return FindCircuitConfig(**dict(dict(model=model, method=method, n_examples=8, batch_size=4,
                                       top_n=10), **extra))


@pytest.mark.slow
def test_outputs_and_determinism(tiny_model, tmp_path, capsys):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  summary = find_circuit(_config(tiny_model), a)
  stdout = capsys.readouterr().out
  assert "top edges" in stdout and "faithfulness" in stdout
  assert summary["n_edges"] == 10 and summary["out"] == a and summary["level"] == "edge"
  for f in ("graph.json", "scores.npz", "faithfulness.csv", "circuit.png", "faithfulness.png"):
    assert os.path.exists(os.path.join(a, f)), f
  cfg = models.from_pretrained(tiny_model).cfg
  g = Graph.from_json(os.path.join(a, "graph.json"), cfg)
  doc = json.load(open(os.path.join(a, "graph.json")))
  assert len(doc["edges"]) == g.n_edges
  meta = doc["meta"]
  for k in ("jaxinterp_version", "model_path", "model_hash", "method", "ig_steps", "n_examples",
            "seed", "level", "remat", "ig_convention"):
    assert k in meta
  assert meta["method"] == "EAP-IG-inputs" and meta["n_examples"] == 8 and meta["ig_steps"] == 5
  assert "tau" not in meta and "mask_steps" not in meta  # only the method's own options
  phases = meta["phase_seconds"]  # jaxinterp.runtime.timing: compile taken out of the other phases
  assert list(phases) == ["load", "compile", "attribute", "curve", "write", "total"]
  assert all(isinstance(v, float) and v >= 0 for v in phases.values())
  assert phases["compile"] > 0
  assert sum(v for k, v in phases.items() if k != "total") <= phases["total"]
  assert set(meta["compile_seconds"]) == {"trace", "lower", "backend", "wait"}
  last = stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"phases: load [\d.]+ s, compile [\d.]+ s, attribute [\d.]+ s, "
                      r"curve [\d.]+ s, write [\d.]+ s \(total [\d.]+ s\)", last), last
  with open(os.path.join(a, "faithfulness.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  rows = open(os.path.join(a, "faithfulness.csv")).read().splitlines()
  assert rows[0].startswith("n_edges") and len(rows) > 3
  find_circuit(_config(tiny_model, curve_sizes="mib"), b)  # another curve, the same scores
  sa, sb = np.load(os.path.join(a, "scores.npz")), np.load(os.path.join(b, "scores.npz"))
  np.testing.assert_array_equal(sa["scores"], sb["scores"])
  rows = open(os.path.join(b, "faithfulness.csv")).read().splitlines()[1:]
  sizes = [int(row.split(",")[0]) for row in rows]
  mib = {G.n_edges_at_percentage(p, g.n_edges) for p in G.MIB_PERCENTAGES}
  assert sizes == sorted(mib | {10})  # MIB's sizes (some equal on 46 edges) and top_n's
  assert not os.path.exists(os.path.join(a, ".resume"))


@pytest.mark.slow
def test_the_binary_runs_the_library_pipeline(tiny_model, tmp_path):
  """The binary's flags become the config: the same scores as the library call, and --help lists
  the generated method flags."""
  lib, cli_out = str(tmp_path / "lib"), str(tmp_path / "cli")
  find_circuit(_config(tiny_model, method="EAP", options={"level": "node"}), lib)
  r = _run(_flags(tiny_model, cli_out, method="EAP", level="node"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "top nodes" in r.stdout
  a, b = np.load(os.path.join(lib, "scores.npz")), np.load(os.path.join(cli_out, "scores.npz"))
  np.testing.assert_array_equal(a["scores"], b["scores"])
  meta = json.load(open(os.path.join(cli_out, "graph.json")))["meta"]
  assert meta["level"] == "node" and "ig_steps" not in meta
  r = _run(["--help"])
  assert r.returncode == 0
  for flag in ("--ig_steps", "--ig_convention", "--level", "--[no]remat", "--tau", "--sparsity",
               "--init_from", "--mask_steps", "--mask_lr", "--oa_steps", "--oa_lr",
               "--optimal_values", "--top_n", "--mib_out"):
    assert f"  {flag}:" in r.stdout, flag


def test_library_errors_are_one_line_input_errors(tiny_model, tmp_path):
  """Bad settings raise `InputError` with the binary's one-line messages, before any output."""
  out = str(tmp_path / "x")
  for config, message in [
      (_config(tiny_model, method="EAP", options={"tau": 0.1}), "--tau does not apply to "
                                                                "--method=EAP"),
      (_config(tiny_model, method="EAP", options={"ig_steps": 5}), "--ig_steps does not apply"),
      (_config(tiny_model, n_examples=0), "--n_examples=0: must be at least 1"),
      (_config(tiny_model, method="ACDC", options={"tau": -1.0}), "--tau must be positive"),
      (_config(tiny_model, method="edge-pruning", options={"sparsity": 2.0}),
       "--sparsity is the fraction of edges removed: it must be below 1, got 2.0"),
      (_config(tiny_model, method="nope"), "--method=nope: unknown method 'nope'"),
      (_config(tiny_model, options={"level": "node"}, mib_out=out), "--mib_out writes edge "
                                                                    "scores"),
      (_config(tiny_model, method="EAP-IG-activations", options={"level": "node"}),
       "EAP-IG-activations scores edges only"),
      (_config(tiny_model, method="ACDC", options={"acdc_metric": "x"}), "acdc_metric must be"),
  ]:
    with pytest.raises(inputs.InputError) as e:
      find_circuit(config, out)
    assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    assert not os.path.exists(out)


def test_bad_input_gives_clear_error_and_no_output(tiny_model, tmp_path):
  out = str(tmp_path / "x")
  r = _run(_flags(str(tmp_path / "missing"), out))
  assert r.returncode != 0
  assert "not a directory" in r.stderr and "Traceback" not in r.stderr
  r = _run(_flags(tiny_model, out, task="ioi"))
  assert r.returncode != 0 and "--data" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(out, "graph.json"))


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tiny_model, tmp_path):
  """Kill an exact-patching run at a random point after its first checkpoint; resume; compare."""
  ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
  # No persistent compilation cache here: with the reference run's kernels cached, the killed run
  # could finish inside the kill window.
  # 48 batches: the run is still attributing when the kill lands (its curve compiles during
  # attribution, so little is left after it: ~3.6 s after the first checkpoint here, against
  # <= 1 s).
  args = dict(method="exact", n_examples=96, batch_size=2, compilation_cache="")
  ref = _run(_flags(tiny_model, ref_out, **args))
  assert ref.returncode == 0, ref.stderr[-3000:]

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.find_circuit"] +
                          _flags(tiny_model, out, **args), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  resume_dir = os.path.join(out, ".resume")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(resume_dir) and any(d.startswith("step_") for d in os.listdir(resume_dir)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  time.sleep(random.Random(0).uniform(0.0, 1.0))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(out, "graph.json"))

  # A different method must refuse to resume from this checkpoint.
  r = _run(_flags(tiny_model, out, method="EAP", n_examples=24, batch_size=2,
                  checkpoint_batches=1, compilation_cache=""))
  assert r.returncode != 0 and "different run" in r.stderr and "--method" in r.stderr

  r = _run(_flags(tiny_model, out, **args))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming from checkpoint" in r.stdout
  a, b = np.load(os.path.join(ref_out, "scores.npz")), np.load(os.path.join(out, "scores.npz"))
  np.testing.assert_array_equal(a["scores"], b["scores"])
  assert json.load(open(os.path.join(ref_out, "graph.json")))["edges"] == \
      json.load(open(os.path.join(out, "graph.json")))["edges"]


@pytest.mark.slow
def test_mesh_flag_gives_the_same_scores(tiny_model, cached_run, tmp_path):
  """--mesh=2x2 --fsdp on 4 simulated CPU devices: data- and tensor-parallel scores, with the
  weights also split over the data devices, equal one device's."""
  one, mesh = cached_run["a"], str(tmp_path / "mesh")  # one device: the cached run's first
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-m", "experiments.find_circuit", "--mesh=2x2", "--fsdp"] +
                     _flags(tiny_model, mesh), cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = np.load(os.path.join(one, "scores.npz")), np.load(os.path.join(mesh, "scores.npz"))
  np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4,
                             atol=1e-5 * np.abs(a["scores"]).max())
  bad = _run(_flags(tiny_model, str(tmp_path / "bad")) + ["--mesh=3x3"])
  assert bad.returncode != 0 and "--mesh=3x3" in bad.stderr and "Traceback" not in bad.stderr
  bad = _run(_flags(tiny_model, str(tmp_path / "bad")) + ["--fsdp"])
  assert bad.returncode != 0 and "--fsdp" in bad.stderr and "Traceback" not in bad.stderr
  assert not os.path.exists(str(tmp_path / "bad" / "graph.json"))


@pytest.fixture(scope="module")
def cached_run(tiny_model, tmp_path_factory):
  """The binary's default small run with its own --compilation_cache (cold), made once: the
  compilation-cache test's first run and the mesh test's one-device reference."""
  root = tmp_path_factory.mktemp("cached_run")
  a, cache = str(root / "a"), root / "xla"
  r = _run(_flags(tiny_model, a, compilation_cache=str(cache)))
  assert r.returncode == 0, r.stderr[-3000:]
  return {"a": a, "cache": cache, "entries": sorted(os.listdir(cache))}


@pytest.mark.slow
def test_compilation_cache_is_written_and_reused(tiny_model, cached_run, tmp_path):
  """--compilation_cache stores the compiled kernels; a second run reads them and gives the same
  scores."""
  a, cache, entries = cached_run["a"], cached_run["cache"], cached_run["entries"]
  b = str(tmp_path / "b")
  assert entries, "nothing was cached"
  r = _run(_flags(tiny_model, b, compilation_cache=str(cache)))
  assert r.returncode == 0, r.stderr[-3000:]
  assert set(os.listdir(cache)) == set(entries)  # every kernel came from the cache
  sa, sb = np.load(os.path.join(a, "scores.npz")), np.load(os.path.join(b, "scores.npz"))
  np.testing.assert_array_equal(sa["scores"], sb["scores"])


def test_dtype_and_tokenizer_flags_are_config_fields():
  """--dtype and --tokenizer build FindCircuitConfig's fields (default None: the checkpoint's own
  dtype and tokenizer) and are recorded as settings (run.json, graph.json's meta)."""
  from absl.testing import flagsaver

  from experiments import find_circuit as binary
  from jaxinterp.discovery.config import record
  assert binary.config().dtype is None and binary.config().tokenizer is None
  with flagsaver.flagsaver(dtype="bfloat16", tokenizer="../shared/models/gpt2-tokenizer"):
    config = binary.config()
  assert (config.dtype, config.tokenizer) == ("bfloat16", "../shared/models/gpt2-tokenizer")
  assert record(config)["dtype"] == "bfloat16"
  assert record(config)["tokenizer"] == "../shared/models/gpt2-tokenizer"
