"""The end of a binary's process: `exit_now(code)`, and `end`, which `experiments.cli.run` calls.

A finished run's interpreter would still tear down JAX's and XLA's objects module by module, about
0.3 s of every binary's run (more than a small model's whole attribution) for nothing the run
needs. `exit_now` waits for what the interpreter's exit waits for (the non-daemon threads, then the
`atexit` handlers: logging's, JAX's, orbax's), flushes stdout and stderr, and ends the process
with `os._exit`; only when the binary is the program (`python -m experiments.X`), never when
another program (a test) calls the binary's `main`.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any


def exit_now(code: Any = 0) -> None:
  """End the process with `sys.exit(code)`'s status (None: 0; a non-integer is printed to stderr,
  status 1) once the threads and `atexit` handlers are done, skipping the interpreter's
  teardown."""
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  for t in threading.enumerate():
    if t is not threading.main_thread() and not t.daemon:
      t.join()
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)


def end(stop: SystemExit, program: bool) -> None:
  """A binary's `SystemExit`: `exit_now(stop.code)` if the binary is the `program`, else raised
  again (a test calling the binary sees `app.run`'s exit)."""
  if not program:
    raise stop
  exit_now(stop.code)
