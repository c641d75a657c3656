"""jaxinterp.runtime.timing: phases on the wall clock, with JAX's compile time moved into its own
phase."""

import threading

import jax
import jax.numpy as jnp
import pytest

from jaxinterp.runtime import timing

BACKEND = "/jax/core/compile/backend_compile_duration"


class FakeClock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_compile_is_taken_out_of_the_phase_it_falls_in():
  clock = FakeClock()
  phases = timing.Phases(("load", "compile", "attribute", "write"), clock=clock)
  with phases:
    clock.t += 1.0  # before any phase: in the total only
    phases.start("load")
    clock.t += 5.0
    jax.monitoring.record_event_duration_secs(BACKEND, 2.0)
    phases.start("attribute")
    clock.t += 1.0
    jax.monitoring.record_event_duration_secs(BACKEND, 3.0)  # more than the phase's wall time
    snap = phases.snapshot()  # the running phase counts up to now
    assert snap["attribute"] == 0.0 and snap["compile"] == pytest.approx(3.0)
    phases.start("write")
    clock.t += 0.5
  jax.monitoring.record_event_duration_secs(BACKEND, 7.0)  # closed: not counted
  clock.t += 1.0
  s = phases.snapshot()
  assert list(s) == ["load", "compile", "attribute", "write", "total"]
  assert s == pytest.approx({"load": 3.0, "compile": 3.0, "attribute": 0.0, "write": 0.5,
                             "total": 8.5})
  assert sum(v for k, v in s.items() if k != "total") <= s["total"]
  assert phases.compile_by_kind["backend"] == pytest.approx(5.0)
  assert phases.line() == "load 3.0 s, compile 3.0 s, attribute 0.0 s, write 0.5 s (total 8.5 s)"


def test_a_real_compile_is_counted():
  with timing.Phases(("run",)) as phases:
    phases.start("run")
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.25)  # a new function: traced and compiled here
    jax.block_until_ready(f(jnp.ones((8, 8))))
  s = phases.seconds()
  assert list(s) == ["run", "compile"]
  assert s["compile"] > 0 and s["run"] >= 0
  assert phases.compile_by_kind["backend"] > 0 and phases.compile_by_kind["trace"] > 0
  with timing.CompileTimer() as c:
    jax.block_until_ready(f(jnp.ones((8, 8))))  # cached in memory: no compile
  assert c.seconds == 0.0


def test_compile_is_not_a_phase_to_start():
  with pytest.raises(ValueError, match="measured"):
    timing.Phases().start("compile")


def test_compiles_in_background_are_not_counted():
  """A thread compiling ahead inside `in_background` is off the critical path: neither a timer nor
  the phases count it, while the main thread's compiles still count."""
  import threading
  clock = FakeClock()
  phases = timing.Phases(("attribute",), clock=clock)
  with phases, timing.CompileTimer() as timer:
    phases.start("attribute")
    clock.t += 4.0

    def ahead():
      with timing.in_background():
        jax.monitoring.record_event_duration_secs(BACKEND, 3.0)

    thread = threading.Thread(target=ahead)
    thread.start()
    thread.join()
    jax.monitoring.record_event_duration_secs(BACKEND, 1.0)  # this thread's own compile
    phases.stop()
  assert timer.seconds == pytest.approx(1.0)
  assert phases.seconds() == pytest.approx({"attribute": 3.0, "compile": 1.0})
  with timing.CompileTimer() as timer:  # the block's flag is this thread's, and only inside it
    with timing.in_background():
      jax.monitoring.record_event_duration_secs(BACKEND, 2.0)
    jax.monitoring.record_event_duration_secs(BACKEND, 0.5)
  assert timer.seconds == pytest.approx(0.5)




class ArmedClock(FakeClock):
  """A fake clock that, once armed, sets `read` at its next reading (after taking it)."""

  def __init__(self):
    super().__init__()
    self.read = threading.Event()
    self.armed = False

  def __call__(self):
    t = self.t
    if self.armed:
      self.read.set()
    return t


def test_waiting_for_a_background_compile_counts_as_compile():
  clock = ArmedClock()
  with timing.Phases(("attribute", "compile", "curve"), clock=clock) as phases:
    phases.start("curve")
    clock.t += 1.0

    def compiling():  # the thread's own compile events are not counted, its wait is
      with timing.in_background():
        jax.monitoring.record_event_duration_secs(BACKEND, 9.0)
      clock.read.wait()  # until the caller has started waiting
      clock.t += 2.5  # the caller waits 2.5 s for it

    thread = threading.Thread(target=compiling)
    thread.start()
    clock.armed = True
    phases.wait_for_compile(thread)
    clock.armed = False
    assert not thread.is_alive()
    phases.wait_for_compile(None)  # nothing started ahead: nothing to wait for
    clock.t += 0.5
  s = phases.snapshot()
  assert s == pytest.approx({"attribute": 0.0, "compile": 2.5, "curve": 1.5, "total": 4.0})
  assert phases.compile_by_kind == pytest.approx({"trace": 0.0, "lower": 0.0, "backend": 0.0,
                                                  "wait": 2.5})
