"""circuit-tracer in its own virtual environment, for the equality tests: its interpreter, whether
circuit-tracer is installed there, and running a driver script (`*_driver.py`) with it.

The interpreter is $JAXINTERP_CIRCUIT_TRACER_PYTHON, by default ../ct-venv/bin/python next to the
repository; the tests that need it skip when it (or circuit-tracer in it) is absent. (Not named
circuit_tracer.py: the drivers, run from this directory, import the real circuit_tracer.)
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("JAXINTERP_CIRCUIT_TRACER_PYTHON",
                        str(ROOT.parent / "ct-venv" / "bin" / "python"))


def have_circuit_tracer() -> bool:
  """Whether `PYTHON` exists and imports circuit_tracer."""
  if not os.path.exists(PYTHON):
    return False
  r = subprocess.run([PYTHON, "-c", "import circuit_tracer"], capture_output=True)
  return r.returncode == 0


def run_driver(driver, base, output: str, *, timeout: int = 900) -> dict[str, np.ndarray]:
  """Run `PYTHON driver base` (on CPU, offline) and assert it succeeded; return the arrays the
  driver wrote to base/ct/`output` (an .npz)."""
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_OFFLINE": "1"}
  r = subprocess.run([PYTHON, str(driver), str(base)], capture_output=True, text=True, env=env,
                     timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(pathlib.Path(base) / "ct" / output) as z:
    return {k: z[k] for k in z.files}
