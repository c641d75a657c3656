"""Scoring attribution methods against circuits known exactly (`experiments/ground_truth.py`'s
pipeline).

`ground_truth(GroundTruthConfig(...), out)` runs each method under each ablation it supports
(`recovery.benchmark`) on a user's tracr program (`program="FILE.py:FUNCTION"` with `vocab` and
`max_seq_len`) or on the built-in set (`builtin`: tracr's library programs and the bundled toy
model, each in its own subdirectory of `out`), and writes per case `truth.json` and the methods'
graphs (`recovery.write_case`), then `auroc.json` (edge- and node-level AUROC of every method and
ablation, with times) in `out`, and `DONE`. Without tracr, the built-in set shrinks to the toy
model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from jaxinterp import attribution
from jaxinterp.groundtruth import recovery, tracr_tasks
from jaxinterp.runtime import files, inputs

BUILTIN = (*tracr_tasks.LIBRARY, "toy")
INTERVENTIONS = tuple(i for i in attribution.INTERVENTIONS if i != "optimal")  # optimal trains


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
  """Which programs, methods and ablations `ground_truth` runs. Fields named as the binary's
  flags."""

  program: str | None = None  # FILE.py:FUNCTION returning a RASP SOp; None: the built-in set
  vocab: str | None = None  # the program's vocabulary, comma-separated (ints read as ints)
  max_seq_len: int | None = None  # longest input (BOS not counted)
  causal: bool = False  # compile a causal model (tracr's default is non-causal)
  methods: str = ",".join(attribution.METHODS)  # comma-separated attribution methods
  interventions: str = "patching,zero-all"  # comma-separated ablations, of `INTERVENTIONS`
  position: str = "all"  # output position the metric reads (0-based, BOS not counted), or "all"
  n_examples: int = 16  # clean/corrupted input pairs per program (the toy: at least 64 prompts)
  ig_steps: int = 5  # integrated-gradient steps of the EAP-IG methods
  batch_size: int = 64  # rows per batch
  seed: int = 0  # seed of the sampled inputs
  builtin: str = ",".join(BUILTIN)  # without `program`: the built-in programs to run


def _names(flag: str, text: str, known: Sequence[str]) -> list[str]:
  names = [x.strip() for x in (text or "").split(",") if x.strip()]
  bad = [x for x in names if x not in known]
  if bad or not names:
    raise inputs.InputError(f"--{flag}={text}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
                            f"choose from {', '.join(known)}")
  return names


def _position(text: str) -> int | None:
  text = text.strip()
  if text == "all":
    return None
  try:
    return int(text)
  except ValueError:
    raise inputs.InputError(f"--position={text}: expected an integer or 'all'") from None


def _user_case(config: GroundTruthConfig, position: int | None, n: int) -> recovery.Case:
  """Load, compile and port `config.program` (every failure an InputError, before any output)."""
  spec = config.program
  try:
    tracr_tasks.require_tracr()
    if not config.vocab:
      raise tracr_tasks.ProgramError("--vocab is required with --program")
    if config.max_seq_len is None:
      raise tracr_tasks.ProgramError("--max_seq_len is required with --program")
    vocab = tracr_tasks.parse_vocab(config.vocab)
    fn = tracr_tasks.load_program(spec)
    program = tracr_tasks.build_program(fn, spec.rpartition(":")[2])
    assembled = tracr_tasks.compile_program(program, vocab, config.max_seq_len, config.causal)
    return recovery.tracr_case(spec, assembled, program, n, config.seed, position,
                               {"program": spec, "vocab": vocab,
                                "max_seq_len": config.max_seq_len})
  except tracr_tasks.ProgramError as e:
    raise inputs.InputError(f"--program={spec}: {e}") from None


def _cases(config: GroundTruthConfig, position: int | None, n: int
           ) -> list[tuple[str | None, Callable[[], recovery.Case]]]:
  """(name, thunk) for each case to run: the program (name None), or the built-in set."""
  if config.program:
    return [(None, lambda: _user_case(config, position, n))]
  names = _names("builtin", config.builtin, BUILTIN)
  try:
    tracr_tasks.require_tracr()
  except tracr_tasks.ProgramError as e:
    names = [x for x in names if x == "toy"]
    inputs.warn(f"{e}; running the toy model only")
    if not names:
      raise inputs.InputError(str(e)) from None
  seed = config.seed
  return [(name, (lambda: recovery.toy_case(max(n, 64), seed)) if name == "toy" else
           (lambda name=name: recovery.library_case(name, n, seed, position)))
          for name in names]


def _report(r: recovery.MethodResult) -> None:
  fmt = recovery.fmt_auroc
  print(f"  {r.method:20s} {r.intervention:9s} edge AUROC {fmt(r.scores['edge_auroc'])}  "
        f"node AUROC {fmt(r.scores['node_auroc'])}  ({r.seconds:.1f} s)", flush=True)


def run_record(config: GroundTruthConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config, whole, and the program file's digest."""
  program = (config.program or "").rpartition(":")[0] or None
  return files.RunRecord("ground_truth", dict(dataclasses.asdict(config),
                                              program_sha256=inputs.file_digest(program)),
                         ("program", "builtin", "methods"))


def ground_truth(config: GroundTruthConfig, out: str, *, overwrite: bool = False) -> dict:
  """Run the cases (see the module docstring), print each result and the table, and return
  `auroc.json`'s contents (with the config, whole, as every graph's meta has it). Bad input raises
  `inputs.InputError` before anything is written; an `out` holding other outputs is refused unless
  `overwrite`, and this run, finished, is left as it is."""
  methods = _names("methods", config.methods, tuple(attribution.METHODS))
  ivs = _names("interventions", config.interventions, INTERVENTIONS)
  n = inputs.positive("n_examples", config.n_examples)
  ig_steps = inputs.positive("ig_steps", config.ig_steps)
  batch = inputs.positive("batch_size", config.batch_size)
  cases = _cases(config, _position(config.position), n)
  first = cases[0][1]() if cases[0][0] is None else None  # a program: fail before writing
  entries, written = {}, []
  record = run_record(config)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as held:
    if held.complete:
      inputs.already_complete(out, record)
      with open(os.path.join(out, "auroc.json")) as f:
        return json.load(f)
    with held.writing(written):  # DONE checks `written` at the end
      _run_cases(config, cases, first, methods, ivs, (ig_steps, batch), out, entries, written)
  doc = {"programs": entries, "config": dataclasses.asdict(config)}
  print(recovery.table(entries))
  print(f"wrote {out}/auroc.json")
  return doc


def _run_cases(config: GroundTruthConfig, cases: list, first: recovery.Case | None,
               methods: list[str], ivs: list[str], sizes: tuple[int, int], out: str,
               entries: dict, written: list[str]) -> None:
  """Run and write each case, then `auroc.json` (filling `entries` and `written`)."""
  ig_steps, batch = sizes
  for name, make in cases:
    try:
      case = first if name is None else make()
    except tracr_tasks.ProgramError as e:  # e.g. --position past a built-in program's length
      raise inputs.InputError(f"{name}: {e}") from None
    sub = out if name is None else os.path.join(out, name)
    print(f"{case.name}: {case.info.get('n_layers')} layers, {case.info.get('n_heads')} heads, "
          f"{int(case.truth.in_graph.sum())} true edges of {int(case.truth.valid.sum())}",
          flush=True)
    results = recovery.benchmark(case, methods, ivs, ig_steps, batch, on_result=_report)
    meta = {"methods": methods, "interventions": ivs, "seed": config.seed,
            "ig_steps": ig_steps, "config": dataclasses.asdict(config)}
    rel = recovery.write_case(case, results, sub, meta)
    written.extend(rel if name is None else [os.path.join(name, p) for p in rel])
    entries[case.name] = recovery.summary(case, results)
  doc = {"programs": entries, "config": dataclasses.asdict(config)}
  files.atomic_write_json(os.path.join(out, "auroc.json"), doc)
  written.append("auroc.json")
