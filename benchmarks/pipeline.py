"""The `pipeline` suite: `find_circuit` end to end against `attribute` alone, as whole processes.

    python -m benchmarks.run --suite=pipeline --shapes=gpt2-small --n=32 --out=results.json

Per round, in one run and one after the other, each a fresh Python process on the same random-init
HF GPT-2 checkpoint of the shape (with the GPT-2 tokenizer beside it):

* `find_circuit`: `python -m experiments.find_circuit` with EAP-IG-inputs (m = --steps), the --n
  examples, --batch_size, and a 10-point faithfulness curve at MIB's edge percentages
  (`--curve_sizes=mib`, `--top_n` set to the 0.1% circuit so no eleventh size is added). Its own
  phase times (load, compile, attribute, curve, write) are read from the `meta` of the graph.json
  it writes; `startup_s` is the rest of its wall time (interpreter start, imports, flag parsing).
* `attribute`: `python -m benchmarks.whole_process --impl=jax`, the same attribution and nothing
  else (no curve, nothing written), as the `whole_process` suite runs it.
* `eap`: the `eap` package's pipeline (`benchmarks/eap_pipeline.py`: EAP-IG-inputs on
  TransformerLens, the same ten circuits evaluated, graph.json written) when `import eap` can work;
  a row saying it is not installed otherwise.

The data are the first --n IOI examples (`../shared`, GPT-2 vocabulary); for shapes or machines
without them, find_circuit and attribute both use the same generated induction examples and the
eap row is skipped (the package reads text). Every process runs with no persistent compilation
cache (`--compilation_cache=` and `JAXINTERP_COMPILATION_CACHE=""`; `JAX_COMPILATION_CACHE_DIR`
unset), so each compiles everything it runs. Without --quick, find_circuit and attribute then run
twice more with a persistent compilation cache of their own: the first run fills it (not reported),
the second reads it back ("warm" rows), as a researcher's second run would. The summary rows hold
the ratio find_circuit / attribute alone per cache state (the issue's target: at most 1.5) and
eap / find_circuit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from jaxinterp import circuits
from jaxinterp.circuits.layout import valid_edges

TARGET_RATIO = 1.5  # find_circuit's whole process at most 1.5x attribute alone (issue 15)
COLD = "no persistent compilation cache (every kernel compiled in the process)"
WARM = ("a warm persistent compilation cache (filled by an earlier run of the same command: "
        "kernels read back, not compiled)")
TIMES = {
    "find_circuit": "whole process, fresh interpreter: imports, model and data loading, EAP-IG "
                    "attribution, a 10-point faithfulness curve (MIB's percentages), every output "
                    "written; " + COLD,
    "attribute": "whole process, fresh interpreter: imports, model and data loading, "
                 "jaxinterp.attribution.attribute (EAP-IG) only, nothing written; " + COLD,
    "eap": "whole process, fresh interpreter: imports, TransformerLens model from the HF "
           "checkpoint, eap.attribute (EAP-IG-inputs), baselines and a 10-point curve with "
           "eap.evaluate_graph, graph.json written",
}
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "model_max_length": 1024}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def uses_ioi(shape: str) -> bool:
  """Whether the shape can read the IOI examples (as `common.ioi_or_random` decides)."""
  return (common.IOI_CSV.exists() and common.GPT2_TOKENIZER.exists()
          and common.SHAPES[shape]["d_vocab"] >= 50257)


def model_dir(workdir: str, shape: str) -> str:
  """The shape's random-init HF checkpoint (`common.gpt2_checkpoint`), linked into a directory that
  also holds the GPT-2 tokenizer when the shape has its vocabulary (find_circuit and eap read
  text)."""
  ckpt = common.gpt2_checkpoint(os.path.join(workdir, shape), shape)
  out = os.path.join(workdir, f"{shape}-pipeline")
  if not os.path.isdir(out):
    tmp = tempfile.mkdtemp(dir=workdir)
    for name in os.listdir(ckpt):
      os.symlink(os.path.abspath(os.path.join(ckpt, name)), os.path.join(tmp, name))
    if uses_ioi(shape):
      shutil.copyfile(common.GPT2_TOKENIZER, os.path.join(tmp, "tokenizer.json"))
      with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    os.replace(tmp, out)
  return out


def _env() -> dict:
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
             JAXINTERP_COMPILATION_CACHE="")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _process(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
  """(wall seconds, result) of one fresh process; raises on failure."""
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(common.REPO))
  wall = time.perf_counter() - t0
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
  return wall, p


def _result_line(p: subprocess.CompletedProcess) -> dict:
  lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
  if not lines:
    raise RuntimeError(f"no RESULT line in:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _n_edges(shape: str) -> int:
  return int(valid_edges(common.model_config(shape)).sum())


def run_find_circuit(d: str, shape: str, n: int, batch: int, steps: int, out: str,
                     cache: str = "") -> dict:
  """find_circuit as a fresh process; its wall time and the phase times its graph.json records.
  `cache`: its --compilation_cache (empty: none)."""
  top_n = circuits.n_edges_at_percentage(circuits.MIB_PERCENTAGES[0], _n_edges(shape))
  data = ["--task=ioi", f"--data={common.IOI_CSV}"] if uses_ioi(shape) else ["--task=induction"]
  cmd = [sys.executable, "-m", "experiments.find_circuit", f"--model={d}", *data,
         f"--n_examples={n}", f"--batch_size={batch}", "--method=EAP-IG-inputs",
         f"--ig_steps={steps}", "--curve_sizes=mib", f"--top_n={top_n}", f"--out={out}",
         f"--compilation_cache={cache}"]
  wall, _ = _process(cmd)
  with open(os.path.join(out, "graph.json")) as f:
    meta = json.load(f)["meta"]
  with open(os.path.join(out, "faithfulness.csv")) as f:
    points = len(f.read().splitlines()) - 1
  phases = meta["phase_seconds"]
  return dict(impl="find_circuit", command=" ".join(cmd[1:]), subprocess_wall_s=wall,
              phase_seconds=phases, compile_seconds=meta.get("compile_seconds"),
              startup_s=wall - phases["total"], curve_points=points,
              n_examples=meta["n_examples"], data=meta["task"] + (" " + meta["data"]
                                                                  if meta["data"] else ""))


def run_attribute(d: str, shape: str, n: int, batch: int, steps: int, cache: str = "") -> dict:
  """`attribute` alone as a fresh process (`benchmarks.whole_process --impl=jax`)."""
  cmd = [sys.executable, "-m", "benchmarks.whole_process", "--impl=jax", f"--checkpoint={d}",
         f"--n={n}", f"--steps={steps}", f"--batch_size={batch}",
         f"--task={'ioi' if uses_ioi(shape) else 'induction'}", f"--compilation_cache={cache}"]
  wall, p = _process(cmd)
  r = _result_line(p)
  return dict(impl="attribute", command=" ".join(cmd[1:]), subprocess_wall_s=wall,
              phase_seconds=r["phases"], n_examples=r["n_examples"], data=r["data"],
              python_start_to_end_s=r["python_start_to_end_s"])


def have_eap() -> bool:
  """Whether `import eap` can work (the package is not a dependency of this project)."""
  return importlib.util.find_spec("eap") is not None


def run_eap(d: str, shape: str, n: int, batch: int, steps: int, out: str) -> dict:
  """The eap package's pipeline as a fresh process, or a row saying why it did not run."""
  row = dict(impl="eap")
  if not have_eap():
    return dict(row, status="not installed (`import eap` fails): not timed")
  if not uses_ioi(shape):
    return dict(row, status="skipped: the eap package reads text prompts, and this shape or "
                            "machine has no IOI data in the GPT-2 vocabulary")
  cmd = [sys.executable, "-m", "benchmarks.eap_pipeline", f"--checkpoint={d}",
         f"--data={common.IOI_CSV}", f"--n={n}", f"--steps={steps}", f"--batch_size={batch}",
         f"--out={out}"]
  wall, p = _process(cmd)
  r = _result_line(p)
  return dict(row, status="ran", command=" ".join(cmd[1:]), subprocess_wall_s=wall,
              phase_seconds=r["phases"], n_examples=r["n_examples"], curve_points=len(r["curve"]),
              python_start_to_end_s=r["python_start_to_end_s"], torch_threads=r["torch_threads"],
              eap_version=r["eap_version"], data=f"ioi {common.IOI_CSV}")


def suite_pipeline(ctx, shape: str, n: int, batch: int, steps: int, repeats: int) -> list[dict]:
  """Rows of the `pipeline` suite for one (GPT-2-family) shape: one per process and round, and a
  summary row per round with the ratios."""
  if common.SHAPES[shape]["family"] != "gpt2":
    return []
  d = model_dir(ctx.workdir, shape)
  rows = []
  for rep in range(1 if ctx.quick else max(1, repeats // 2)):
    tmp = tempfile.mkdtemp(prefix="pipeline-", dir=ctx.workdir)
    base = dict(suite="pipeline", shape=shape, repeat=rep, batch_size=batch, ig_steps=steps,
                method="EAP-IG-inputs")
    got = {}
    caches = {impl: os.path.join(tmp, f"xla-{impl}") for impl in ("find_circuit", "attribute")}
    # Cold: no cache (every kernel compiled). Warm: a cache a first run of the same process filled.
    plan = [("find_circuit", "cold"), ("attribute", "cold"), ("eap", "cold")]
    plan += [] if ctx.quick else [(impl, step) for step in ("fill", "warm")
                                  for impl in ("find_circuit", "attribute")]
    for impl, cache_state in plan:
      log(f"[pipeline] {shape} {impl} ({cache_state}, fresh process)")
      load = common.load_average()
      cache = caches.get(impl, "") if cache_state != "cold" else ""
      if impl == "find_circuit":
        r = run_find_circuit(d, shape, n, batch, steps,
                             os.path.join(tmp, f"find_circuit-{cache_state}"), cache)
      elif impl == "attribute":
        r = run_attribute(d, shape, n, batch, steps, cache)
      else:
        r = run_eap(d, shape, n, batch, steps, os.path.join(tmp, "eap"))
      if cache_state == "fill":
        continue
      got[(impl, cache_state)] = r
      times = TIMES[impl] if "subprocess_wall_s" in r else "not timed"
      if cache_state == "warm":
        times = times.replace(COLD, WARM)
      rows.append(dict(base, **r, compilation_cache=cache_state, times=times,
                       load_average_before=load))
    shutil.rmtree(tmp, ignore_errors=True)
    for state in ("cold", "warm"):
      if ("find_circuit", state) not in got:
        continue
      fc = got[("find_circuit", state)]["subprocess_wall_s"]
      attr = got[("attribute", state)]["subprocess_wall_s"]
      summary = dict(base, summary=True, compilation_cache=state,
                     times=f"ratios of the {state}-cache whole-process wall times above",
                     find_circuit_over_attribute=fc / attr, target=TARGET_RATIO,
                     meets_target=fc / attr <= TARGET_RATIO)
      eap = got.get(("eap", state), {})
      if "subprocess_wall_s" in eap:
        summary["eap_over_find_circuit"] = eap["subprocess_wall_s"] / fc
      rows.append(summary)
      log(f"[pipeline] {shape} ({state} cache): find_circuit {fc:.1f} s, attribute alone "
          f"{attr:.1f} s (x{fc / attr:.2f}, target <= {TARGET_RATIO})")
  return rows
