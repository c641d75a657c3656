"""The benchmark harness runs in --quick mode and writes a parseable results file (no timing checks)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_harness_writes_results(tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--suite=attribution,exact,evaluation,memory",
         "--methods=EAP-IG-inputs", f"--out={out}", f"--workdir={tmp_path}"]
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
  assert [r for r in rows if r["suite"] == "evaluation"][0]["circuits_per_s"] > 0


def test_unknown_suite_is_refused(tmp_path):
  p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite=nope", "--quick",
                      f"--out={tmp_path / 'r.json'}"], cwd=str(REPO), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode != 0 and "unknown suite" in p.stderr
