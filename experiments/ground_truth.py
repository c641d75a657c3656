"""Score attribution methods against circuits known exactly: tracr-compiled RASP programs.

    python -m experiments.ground_truth --program=prog.py:make_program --vocab=0,1,2,3 \\
        --max_seq_len=5 --methods=EAP,EAP-IG-inputs,exact --out=runs/ground_truth
    python -m experiments.ground_truth --out=runs/ground_truth    # the built-in set

`--program=FILE.py:FUNCTION` names a function that takes no arguments and returns a RASP SOp (the
program's output). It is compiled with tracr (`compiler_bos="BOS"`, `--causal` for a causal model;
tracr's default is non-causal) for the vocabulary `--vocab` (comma-separated; integers are read as
ints) and inputs of up to `--max_seq_len` values, ported to jaxinterp's decoder, and its true
circuit is derived from the weights (jaxinterp/groundtruth/truth.py: an edge is true iff its sender
writes a residual direction its receiver reads). Clean and corrupted inputs are sampled uniformly;
the metric is the output-space value of the clean output at `--position` (default: every position).
Each `--methods` entry runs under each `--interventions` ablation it supports.

Without `--program` it runs the built-in set (`--builtin`): tracr's library programs (reverse,
frac_prevs, sort, hist, sort_freq, pair_balance) and the bundled toy induction model
with its documented circuit, each in its own subdirectory of `--out`.

Writes, per program: `truth.json` (the true circuit, EAP-IG graph format: `in_graph` marks the true
edges), `{method}/graph.json` (the method's scores under patching; `graph.{intervention}.json` under
the other ablations; the top edges by |score|, as many as there are true ones, are `in_graph`), and
`auroc.json` in `--out`: edge- and node-level AUROC by |score| for every method and ablation, the
time each took, and how many true edges the ablation can see. True edges that only carry what is
the same in the clean and the ablated run (positions, BOS, a constant length) are left out of that
ablation's AUROC (see jaxinterp/groundtruth/truth.py). tracr is optional: pip install "jaxinterp[tracr]".
"""

from __future__ import annotations

import os

from absl import app

from jaxinterp import attribution
from jaxinterp.runtime import files
from jaxinterp.groundtruth import recovery
from jaxinterp.groundtruth import tracr_tasks
from jaxinterp.experiments import cli, common

BUILTIN = tuple(tracr_tasks.LIBRARY) + ("toy",)
DEFAULT_METHODS = ",".join(attribution.METHODS)
_IVS = tuple(i for i in attribution.INTERVENTIONS if i != "optimal")  # optimal needs training

cli.define("string", "program", None,
           "FILE.py:FUNCTION returning the RASP program's output SOp. Without it: the built-in set.")
cli.define("string", "vocab", None, "The program's vocabulary, comma-separated (ints read as ints), "
           "e.g. 0,1,2,3 or a,b,c. Required with --program.")
cli.define("integer", "max_seq_len", None, "Longest input (BOS not counted); inputs are sampled at "
           "this length. Required with --program.")
cli.define("bool", "causal", False, "Compile a causal model (tracr's default is non-causal).")
cli.define("string", "methods", DEFAULT_METHODS,
           f"Comma-separated attribution methods, of: {', '.join(attribution.METHODS)}.")
cli.define("string", "interventions", "patching,zero-all",
           f"Comma-separated ablations, of: {', '.join(_IVS)}; a method runs under those it "
           f"supports (EAP-IG-inputs: patching only). zero-all zeroes every sender, positions "
           f"included, so it also sees the edges that patching cannot.")
cli.define("string", "position", "all", "Output position the metric reads (0-based, BOS not "
           "counted), or 'all' for every position (one row per example and position).")
cli.define("integer", "n_examples", 16, "Clean/corrupted input pairs per program (the toy model: "
           "this many prompts, at least 64).")
cli.define("integer", "ig_steps", 5, "Integrated-gradient steps of the EAP-IG methods.")
cli.define("integer", "batch_size", 64, "Rows per batch.")
cli.define("integer", "seed", 0, "Seed of the sampled inputs.")
cli.define("string", "builtin", ",".join(BUILTIN),
           f"Without --program: the built-in programs to run, of: {', '.join(BUILTIN)}.")
cli.define("string", "out", "runs/ground_truth", "Output directory.")


def _names(flag: str, text: str, known) -> list[str]:
  names = [x.strip() for x in (text or "").split(",") if x.strip()]
  bad = [x for x in names if x not in known]
  if bad or not names:
    raise app.UsageError(f"--{flag}={text}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
                         f"choose from {', '.join(known)}")
  return names


def _position():
  text = cli.value("position", "all").strip()
  if text == "all":
    return None
  try:
    return int(text)
  except ValueError:
    raise app.UsageError(f"--position={text}: expected an integer or 'all'") from None


def _user_case(position, n, seed) -> recovery.Case:
  """Load, compile and port `--program` (every failure a UsageError, before any output)."""
  spec = cli.value("program", None)
  try:
    tracr_tasks.require_tracr()
    if not cli.value("vocab", None):
      raise tracr_tasks.ProgramError("--vocab is required with --program")
    max_len = cli.value("max_seq_len", None)
    if max_len is None:
      raise tracr_tasks.ProgramError("--max_seq_len is required with --program")
    vocab = tracr_tasks.parse_vocab(cli.value("vocab", None))
    fn = tracr_tasks.load_program(spec)
    program = tracr_tasks.build_program(fn, spec.rpartition(":")[2])
    assembled = tracr_tasks.compile_program(program, vocab, max_len, cli.value("causal", False))
    return recovery.tracr_case(spec, assembled, program, n, seed, position,
                               {"program": spec, "vocab": vocab, "max_seq_len": max_len})
  except tracr_tasks.ProgramError as e:
    raise app.UsageError(f"--program={spec}: {e}") from None


def _cases(position, n, seed):
  """(name, thunk) for each case to run: --program, or the built-in set."""
  if cli.value("program", None):
    return [(None, lambda: _user_case(position, n, seed))]
  names = _names("builtin", cli.value("builtin", ",".join(BUILTIN)), BUILTIN)
  try:
    tracr_tasks.require_tracr()
  except tracr_tasks.ProgramError as e:
    names = [x for x in names if x == "toy"]
    cli.warn(f"{e}; running the toy model only")
    if not names:
      raise app.UsageError(str(e)) from None
  out = []
  for name in names:
    if name == "toy":
      out.append((name, lambda: recovery.toy_case(max(n, 64), seed)))
    else:
      out.append((name, lambda name=name: recovery.library_case(name, n, seed, position)))
  return out


def _report(r: recovery.MethodResult) -> None:
  fmt = recovery.fmt_auroc
  print(f"  {r.method:20s} {r.intervention:9s} edge AUROC {fmt(r.scores['edge_auroc'])}  node AUROC "
        f"{fmt(r.scores['node_auroc'])}  ({r.seconds:.1f} s)", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  methods = _names("methods", cli.value("methods", DEFAULT_METHODS), tuple(attribution.METHODS))
  ivs = _names("interventions", cli.value("interventions", "patching,zero-all"), _IVS)
  n = common.positive("n_examples", cli.value("n_examples", 16))
  ig_steps = common.positive("ig_steps", cli.value("ig_steps", 5))
  batch = common.positive("batch_size", cli.value("batch_size", 64))
  seed = cli.value("seed", 0)
  position = _position()
  out = cli.value("out", "runs/ground_truth")
  cases = _cases(position, n, seed)
  first = cases[0][1]() if cases[0][0] is None else None  # --program: fail before writing
  common.enable_compilation_cache()
  entries, written = {}, []
  with common.run_dir(out) as held, held.writing(written):  # DONE checks `written` at the end
    for name, make in cases:
      try:
        case = first if name is None else make()
      except tracr_tasks.ProgramError as e:  # e.g. --position past a built-in program's length
        raise app.UsageError(f"{name}: {e}") from None
      sub = out if name is None else os.path.join(out, name)
      print(f"{case.name}: {case.info.get('n_layers')} layers, {case.info.get('n_heads')} heads, "
            f"{int(case.truth.in_graph.sum())} true edges of {int(case.truth.valid.sum())}",
            flush=True)
      results = recovery.benchmark(case, methods, ivs, ig_steps, batch, on_result=_report)
      meta = {"methods": methods, "interventions": ivs, "seed": seed, "ig_steps": ig_steps}
      rel = recovery.write_case(case, results, sub, meta)
      written += rel if name is None else [os.path.join(name, p) for p in rel]
      entries[case.name] = recovery.summary(case, results)
    files.atomic_write_json(os.path.join(out, "auroc.json"), {"programs": entries})
    written.append("auroc.json")
  print(recovery.table(entries))
  print(f"wrote {out}/auroc.json")


if __name__ == "__main__":
  cli.run(main)
