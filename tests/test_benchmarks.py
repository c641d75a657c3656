"""The benchmark harness runs in --quick mode and writes a parseable results file (no timing
checks), and the recorded results that the docs cite are where the docs say."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_harness_writes_results(tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.run", "--quick",
         "--suite=attribution,exact,evaluation,memory", "--methods=EAP-IG-inputs", f"--out={out}",
         f"--workdir={tmp_path}"]
  p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads(out.read_text())
  env_info = res["environment"]
  assert env_info["backend"] and env_info["jax_version"]
  assert res["config"]["quick"] is True
  rows = res["results"]
  assert {r["suite"] for r in rows} == {"attribution", "exact", "evaluation", "memory"}
  mem = [r for r in rows if r["suite"] == "memory"]
  assert {r["dtype"] for r in mem} == {"float32", "bfloat16"}
  assert all(r["argument_gib"] > 0 and r["temp_gib"] >= 0 and r["fits_80gb"] for r in mem)
  kernels = {r["kernel"] for r in rows if r["suite"] == "attribution"}
  assert {"attribute", "torch-eager-baseline"} <= kernels
  for r in rows:
    if "best_s" in r:
      assert r["best_s"] > 0 and len(r["repeats"]) >= 1
  ig = [r for r in rows if r.get("kernel") == "attribute" and r["suite"] == "attribution"]
  assert ig and all(r["speedup_vs_torch"] > 0 and r["examples_per_s"] > 0 for r in ig)
  summary = [r for r in rows if r["suite"] == "exact" and r.get("summary")]
  assert summary and summary[0]["edges_total"] > 0 and summary[0]["edges_examples_per_s"] > 0
  ev = [r for r in rows if r["suite"] == "evaluation"]
  assert {(r["circuits"], r["path"]) for r in ev if "path" in r} == {
      (c, p) for c in ("mib-curve", "random") for p in ("circuit-forward", "reference")}
  assert all(r["circuits_per_s"] > 0 for r in ev if "path" in r)
  curve = [r for r in ev if r.get("summary") and r["circuits"] == "mib-curve"][0]
  assert curve["speedup_over_reference"] > 0 and curve["max_abs_faithfulness_difference"] < 1e-4
  memory = [r for r in ev if r.get("kind") == "memory"][0]
  assert memory["circuit_total_gib"] > 0 and memory["total_ratio"] > 0


def test_unknown_suite_is_refused(tmp_path):
  p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite=nope", "--quick",
                      f"--out={tmp_path / 'r.json'}"], cwd=str(REPO), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode != 0 and "unknown suite" in p.stderr


@pytest.mark.slow
def test_quick_pipeline_suite_times_whole_processes(tmp_path):
  """find_circuit, attribute alone and the eap row, each a fresh process; find_circuit's phases."""
  out = tmp_path / "results.json"
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--suite=pipeline", "--shapes=tiny",
         f"--out={out}", f"--workdir={tmp_path}"]
  p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  rows = json.loads(out.read_text())["results"]
  by = {r.get("impl", "summary"): r for r in rows}
  assert set(by) == {"find_circuit", "attribute", "eap", "summary"}
  assert all(r["suite"] == "pipeline" and r["times"] for r in rows)
  fc, attr = by["find_circuit"], by["attribute"]
  phases = fc["phase_seconds"]
  assert list(phases) == ["load", "compile", "attribute", "curve", "write", "total"]
  assert sum(v for k, v in phases.items() if k != "total") <= phases["total"]
  assert phases["total"] < fc["subprocess_wall_s"]
  assert "--compilation_cache=" in fc["command"] and "--curve_sizes=mib" in fc["command"]
  assert fc["curve_points"] >= 1 and attr["subprocess_wall_s"] > 0
  assert by["eap"].get("status")  # ran, not installed, or skipped (tiny has no GPT-2 vocabulary)
  assert by["summary"]["find_circuit_over_attribute"] == pytest.approx(
      fc["subprocess_wall_s"] / attr["subprocess_wall_s"])


def test_pipeline_reports_a_missing_eap_package(monkeypatch):
  from benchmarks import pipeline
  monkeypatch.setattr(pipeline, "have_eap", lambda: False)
  row = pipeline.run_eap("ckpt", "gpt2-small", 8, 4, 5, "out")
  assert row["impl"] == "eap" and row["status"].startswith("not installed")


def test_recorded_results_are_indexed_and_cited_files_exist():
  """Every file in benchmarks/results/ parses and has a row (its command) in benchmarks/RESULTS.md;
  every results file the docs or the benchmarks name exists there."""
  results = REPO / "benchmarks" / "results"
  files = sorted(p.name for p in results.iterdir())
  assert files and not list((REPO / "benchmarks").glob("results_*.json"))
  index = (REPO / "benchmarks" / "RESULTS.md").read_text()
  for name in files:
    assert f"`{name}`" in index, f"{name} has no row in benchmarks/RESULTS.md"
    if name.endswith(".json"):
      json.loads((results / name).read_text())
  pages = [*(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md"),
           *(REPO / "benchmarks").glob("*.py")]
  texts = [p.read_text() for p in pages]
  cited = {m for t in texts for m in re.findall(r"results_cpu_[\w\-]+\.json", t)}
  assert cited and not sorted(cited - set(files))
