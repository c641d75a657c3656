"""What the experiment binaries share: the shared flags (`--compilation_cache`, `--mib_split`, the
multi-process flags) and the start of every run: `jax.distributed` when several processes run the
binary, then the compilation cache.

Every user-facing failure is an `app.UsageError` or an `inputs.InputError` with one clear line
naming the flag, file or row, so a binary never ends in a stack trace from deep inside jit
(`cli.run` prints it as one line).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app

from jaxinterp.experiments import cli
from jaxinterp.runtime import compilation_cache, distributed

# $JAXINTERP_COMPILATION_CACHE overrides the default. Processes may share one cache directory: its
# entries are written atomically (`jaxinterp.runtime.compilation_cache.AtomicFileCache`).
COMPILATION_CACHE = compilation_cache.default_dir()
cli.define("string", "compilation_cache", COMPILATION_CACHE,
           "Directory of JAX's persistent compilation cache: a later run with the same model "
           "shape and batch shapes reuses the compiled kernels instead of recompiling. Empty "
           "disables it. The default comes from $JAXINTERP_COMPILATION_CACHE when set.")
cli.define("string", "mib_split", "train",
           "The split read when --data is a directory holding a local copy of an MIB dataset.")
OVERWRITE_HELP = ("Replace what --out holds: a finished run with other settings, or another "
                  "binary's outputs (refused without it). Without it a finished run with the same "
                  "settings is reported complete and left untouched.")
FILTER_HELP = ("none, or correct: keep only the rows the model gets right (clean metric above the "
               "corrupted one, by the task's own metric), as the EAP-IG and MIB papers do; the "
               "task check before it is printed and recorded in meta either way.")
cli.define("string", "coordinator_address", "",
           "Multi-process runs (jax.distributed): HOST:PORT of process 0, which runs the "
           "coordinator; give the same to every process. Left out with --num_processes or "
           "--process_id, it comes from the environment as JAX detects it (SLURM, Open MPI, cloud "
           "TPU, $JAX_COORDINATOR_ADDRESS). Process p scores every N-th batch; process 0 alone "
           "writes the outputs.")
cli.define("integer", "num_processes", None,
           "Multi-process runs: the number of processes running this binary (see "
           "--coordinator_address); default from the environment.")
cli.define("integer", "process_id", None,
           "Multi-process runs: this process's index, 0 to --num_processes - 1 (0 runs the "
           "coordinator); default from the environment.")
cli.define("integer", "distributed_timeout", distributed.DEFAULT_TIMEOUT,
           "Multi-process runs: seconds a process waits for the coordinator or for the other "
           "processes at a collective before it ends with one line (a process died or hangs). It "
           "must exceed the time of one batch, compilation included.")
SKIP_BAD_ROWS_HELP = ("Leave out --data rows that cannot be used (empty prompts, bad labels) and "
                      "report them, instead of stopping at them.")

def mib_split() -> str:
  """`--mib_split`: the split read from a local copy of an MIB dataset."""
  return cli.value("mib_split", "train")


def start_distributed() -> bool:
  """Start `jax.distributed` from the multi-process flags or the environment, if a multi-process
  run is asked for (`runtime.distributed.initialize`); True if it runs. Before any JAX backend."""
  try:
    return distributed.initialize(cli.value("coordinator_address", "") or None,
                                  cli.value("num_processes", None),
                                  cli.value("process_id", None),
                                  cli.value("distributed_timeout", distributed.DEFAULT_TIMEOUT))
  except distributed.DistributedError as e:
    raise app.UsageError(str(e)) from None


def start_run() -> str | None:
  """Start the run, first thing in every binary's `main` (before JAX starts a backend):
  `start_distributed` (multi-process runs: the other processes' standard output is discarded, so
  the report is printed once, by process 0; errors and progress bars stay on standard error),
  then JAX's persistent compilation cache at `--compilation_cache` (if not empty). Returns the
  cache's directory, or None."""
  if start_distributed() and jax.process_index() > 0:
    sys.stdout = open(os.devnull, "w")  # process 0 prints the run's report alone
  path = cli.value("compilation_cache", COMPILATION_CACHE)
  try:
    return compilation_cache.enable(path)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={path}: {e}") from None
