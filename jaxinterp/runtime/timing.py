"""Wall time of a run's phases, with the time JAX spends compiling split out as a phase of its own.

    phases = timing.Phases(("load", "compile", "attribute", "write"))
    with phases:                   # listens to JAX's compile events while open
      phases.start("load")
      ...
      phases.start("attribute")    # ends "load"
      ...
    phases.seconds()  # {"load": 1.2, "compile": 8.0, "attribute": 10.1, "write": 0.0}
    phases.line()     # "load 1.2 s, compile 8.0 s, attribute 10.1 s, write 0.0 s (total 19.4 s)"

Compiling is what JAX reports through `jax.monitoring` as its three compile events
(`COMPILE_EVENTS`): tracing a jitted function to a jaxpr, lowering the jaxpr to MLIR, and XLA's
backend compile (which includes reading an executable back from the persistent compilation cache).
The small kernels JAX compiles for eager, op-by-op calls count too. The compile time that falls
inside a phase is taken out of that phase and added to "compile", so a phase's figure is its wall
time less its compiles, and the phases add up to at most the total. Compile events are summed over
every thread of the process, except threads inside `in_background()` (compiles overlapped with the
run's own work, off its critical path); a phase gives up at most its own wall time to "compile".
The time a phase then spends waiting for such a thread (`Phases.wait_for_compile`) is compile time
on the critical path, and counts as "compile" too (kind "wait"). Compiles while no phase runs are
not counted.

`CompileTimer` alone sums the compile events while it is open (`with CompileTimer() as c: ...;
c.seconds`), by kind in `c.by_kind`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence

import jax

# jax.monitoring's duration events of a compile (jax/_src/dispatch.py) -> our name for each.
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "backend"}
COMPILE = "compile"
WAIT = "wait"  # the critical path waiting for a compile in a background thread
_background = threading.local()


@contextlib.contextmanager
def in_background():
  """On this thread, compiles inside the block are not counted (by `CompileTimer` or `Phases`).

  For work that overlaps the run's own, such as compiling ahead in a thread: it is off the critical
  path. Join such a thread with `Phases.wait_for_compile`, so that any time the run still waits for
  it counts as compile."""
  _background.on = True
  try:
    yield
  finally:
    _background.on = False


class CompileTimer:
  """Sums JAX's compile events (`COMPILE_EVENTS`) while open, as a context manager.

  Attributes:
    by_kind: seconds per kind ("trace", "lower", "backend", and "wait": waits for a compile in
      another thread, `add_wait`) since the timer was opened.
  """

  def __init__(self):
    self.by_kind = dict.fromkeys((*COMPILE_EVENTS.values(), WAIT), 0.0)
    self._lock = threading.Lock()
    self._open = False

  @property
  def seconds(self) -> float:
    """All compile seconds so far."""
    with self._lock:
      return sum(self.by_kind.values())

  def _listen(self, event: str, duration_secs: float, **_) -> None:
    kind = COMPILE_EVENTS.get(event)
    if kind is not None and self._open and not getattr(_background, "on", False):
      with self._lock:
        self.by_kind[kind] += float(duration_secs)

  def add_wait(self, seconds: float) -> None:
    """Count `seconds` spent waiting for a compile in another thread (kind "wait")."""
    if self._open:
      with self._lock:
        self.by_kind[WAIT] += float(seconds)

  def __enter__(self) -> CompileTimer:
    self._open = True
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    self._open = False  # older jax has no unregister: the closed listener then ignores events
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:
      try:
        unregister(self._listen)
      except (AssertionError, ValueError):
        pass


class Phases:
  """Consecutive phases of a run, timed on the wall clock, with compile time as its own phase.

  Use it as a context manager (it listens to compile events while open); `start(name)` ends the
  running phase and starts `name`; `stop()` (or leaving the `with`) ends it. A phase started twice
  adds up. See the module docstring for what counts as compile.

  Args:
    names: the phases in the order `seconds()` and `line()` report them; "compile" goes where it is
      listed (last if it is not). Other names given to `start` are appended.
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(self, names: Sequence[str] = (), clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._t0 = clock()
    names = list(names) + ([COMPILE] if COMPILE not in names else [])
    self._wall = dict.fromkeys(names, 0.0)  # per phase: wall time less its compiles
    self._compiles = CompileTimer()
    self._running: tuple[str, float, float] | None = None  # (name, start, compile seconds then)

  def __enter__(self) -> Phases:
    self._compiles.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
    self._compiles.__exit__(*exc)

  def start(self, name: str) -> None:
    """End the running phase (if any) and start `name`."""
    if name == COMPILE:
      raise ValueError(f"{COMPILE!r} is measured, not started")
    self.stop()
    self._wall.setdefault(name, 0.0)
    self._running = (name, self._clock(), self._compiles.seconds)

  def stop(self) -> None:
    """End the running phase (no-op when none runs)."""
    if self._running is not None:
      self._add(self._running, self._clock())
      self._running = None

  def _add(self, running, now: float, into: dict | None = None) -> None:
    name, start, compiled = running
    wall = max(now - start, 0.0)
    compile_s = min(max(self._compiles.seconds - compiled, 0.0), wall)
    into = self._wall if into is None else into
    into[name] += wall - compile_s
    into[COMPILE] += compile_s

  def wait_for_compile(self, thread: threading.Thread | None) -> None:
    """Join `thread`, a compile started ahead in the background (`in_background`): the time spent
    waiting for it is compile time on the critical path, so it counts as "compile" (kind "wait"),
    not as the running phase's own."""
    if thread is None:
      return
    t0 = self._clock()
    thread.join()
    self._compiles.add_wait(max(self._clock() - t0, 0.0))

  def snapshot(self) -> dict[str, float]:
    """{phase: seconds, ..., "total": seconds since construction}, the running phase counted up to
    now; read from one clock reading, so the phases add up to at most "total"."""
    now = self._clock()
    out = dict(self._wall)
    if self._running is not None:
      self._add(self._running, now, into=out)
    out["total"] = max(now - self._t0, 0.0)
    return out

  def seconds(self) -> dict[str, float]:
    """{phase: seconds} in report order (the running phase counted up to now)."""
    out = self.snapshot()
    del out["total"]
    return out

  @property
  def compile_by_kind(self) -> dict[str, float]:
    """Every compile event's seconds while open, by kind (not capped by the phases' wall time)."""
    return dict(self._compiles.by_kind)

  def line(self) -> str:
    """`load 1.2 s, compile 8.0 s, ... (total 22.4 s)`."""
    snap = self.snapshot()
    total = snap.pop("total")
    return ", ".join(f"{k} {v:.1f} s" for k, v in snap.items()) + f" (total {total:.1f} s)"
