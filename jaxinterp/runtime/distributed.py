"""Multi-process runs: `jax.distributed` set up once, exact collectives on host data, and time
limits instead of hangs.

A binary runs as N processes of one program (one per host, or several on one host), each with its
own devices. `initialize` starts `jax.distributed` from `--coordinator_address`,
`--num_processes` and `--process_id`, or from the environment as JAX detects it (SLURM, Open MPI,
cloud TPU pods, `$JAX_COORDINATOR_ADDRESS`); on CPU the collectives are gloo's. It must run before
anything initialises a JAX backend (`experiments.common.start_run` calls it first
thing in every binary's `main`).

Attribution splits the batches over the processes (`attribution.attribute`: process p scores
batches p, p + N, ...) and merges their partial `Progress` states after every round through
`allgather_bytes`, so every process ends with the sums one process would have, bitwise. Circuit
evaluation splits its batches the same way (`sum_split`: the per-batch float64 sums of each round
are gathered and added in batch order); so do the task check (`map_split`), mean ablation's means
(`fold_split`: float32 sums added in batch order) and activation patching (`sum_split`), all
bitwise one process's. Optimal ablation splits each training step's rows and adds the gradient
sums (`allreduce_sum`), equal to one process's to float32 rounding. Only process 0 writes files
(`runtime.files`).

No collective may hang: every one runs under `watchdog`, which ends the process with one line
(`prog: error: ...`, exit status 1) when the other processes do not join within
`--distributed_timeout` seconds (a peer died or hangs), or as soon as a peer has ended (its own
output says why). An unreachable coordinator is one line after the timeout too. JAX's own failure
detection (the coordination service's heartbeats) would abort the process with a C++ stack trace
instead, so its timeouts are set beyond ours.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax._src import distributed as _jax_distributed  # the coordination service's key-value store
from jax.experimental import multihost_utils

DEFAULT_TIMEOUT = 300  # seconds a process waits for the others at a collective
_ENDED = "jaxinterp/ended/"  # key-value directory: a process that ends (or gives up) says so here
_POLL_SECONDS = 0.5
_SHUTDOWN_GRACE = 15  # seconds a process that gives up waits at the shutdown barrier
# Environment variables that say a scheduler started this process as one of several.
_CLUSTER_COUNTS = ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")
_state = {"timeout": DEFAULT_TIMEOUT, "collectives": 0}


class DistributedError(ValueError):
  """Settings of a multi-process run that cannot work (bad process counts, no coordinator)."""


def _prog() -> str:
  return os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else "jaxinterp"))[0]


def _die(message: str, status: int = 1) -> None:
  """One line on stderr, then end the process at once (no atexit: JAX's shutdown barrier would
  wait for the peer that is gone)."""
  sys.stdout.flush()
  sys.stderr.write(f"{_prog()}: error: {' '.join(message.split())}\n")
  sys.stderr.flush()
  os._exit(status)


def is_distributed() -> bool:
  """Whether `jax.distributed` is running (without initialising a JAX backend)."""
  return jax.distributed.is_initialized()


def process_index() -> int:
  """This process's index (0 when not distributed; no JAX backend is started for it)."""
  return jax.process_index() if is_distributed() else 0


def process_count() -> int:
  """The number of processes (1 when not distributed; no JAX backend is started for it)."""
  return jax.process_count() if is_distributed() else 1


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0, or the only process."""
  return process_index() == 0


def requested(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> bool:
  """Whether a multi-process run is asked for: by any of the three settings, by
  `$JAX_COORDINATOR_ADDRESS`, or by a scheduler that started several tasks."""
  if coordinator_address or num_processes is not None or process_id is not None:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any(os.environ.get(k, "1").isdigit() and int(os.environ[k]) > 1
             for k in _CLUSTER_COUNTS if k in os.environ)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = DEFAULT_TIMEOUT) -> bool:
  """Start `jax.distributed` if a multi-process run is asked for (`requested`); True if it runs.

  Settings left out come from the environment (JAX's cluster detection: SLURM, Open MPI, cloud
  TPU, `$JAX_COORDINATOR_ADDRESS`). On CPU the collectives are gloo's. Every process connects to
  the coordinator (process 0 runs it) and exchanges its devices; a coordinator that cannot be
  reached, or processes that do not all arrive, within `timeout` seconds end the process with one
  line. Raises DistributedError for settings that cannot work and RuntimeError if a JAX backend was
  initialised already.
  """
  if not requested(coordinator_address, num_processes, process_id):
    return False
  if is_distributed():
    return True
  if not isinstance(timeout, int) or timeout < 1:
    raise DistributedError(f"--distributed_timeout must be a positive number of seconds, got "
                           f"{timeout!r}")
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num_processes must be at least 1, got {num_processes}")
  if process_id is not None and not (
      0 <= process_id < (num_processes if num_processes is not None else process_id + 1)):
    raise DistributedError(f"--process_id={process_id} must be in [0, --num_processes="
                           f"{num_processes})")
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if coordinator_address is not None and ":" not in coordinator_address:
    raise DistributedError(f"--coordinator_address={coordinator_address} must be HOST:PORT")
  _state["timeout"] = timeout
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None and process_id not in (None, 0):
    _wait_for(coordinator_address, timeout)
  what = f"connecting to the coordinator {coordinator_address or '(from the environment)'}"
  with watchdog(what, peers=False):
    try:
      # JAX's own timeouts abort the process with a stack trace: ours (the watchdog) fire first.
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=timeout + 60,
                                 heartbeat_timeout_seconds=max(100, 2 * timeout + 60),
                                 shutdown_timeout_seconds=timeout + 60)
    except (ValueError, TypeError) as e:
      raise DistributedError(f"jax.distributed.initialize: {e} (give --coordinator_address, "
                             f"--num_processes and --process_id)") from None
    except RuntimeError as e:  # a JAX backend started before
      raise DistributedError(f"jax.distributed.initialize: {e}") from None
  with watchdog("exchanging the devices of every process", peers=False):
    jax.devices()  # every process's backend joins here: the topology exchange is a collective
  atexit.register(_end)
  return True


def _wait_for(address: str, timeout: int) -> None:
  """Until a TCP connection to `address` succeeds; one line and exit after `timeout` seconds (JAX's
  own connect aborts the process with a stack trace)."""
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except ValueError:
      raise DistributedError(f"--coordinator_address={address}: the port is not a number") \
          from None
    except OSError as e:
      if time.monotonic() >= deadline:
        _die(f"cannot reach the coordinator {address} within {timeout} s "
             f"(--distributed_timeout): {e.strerror or e}", status=2)
      time.sleep(_POLL_SECONDS)


def _client():
  return getattr(_jax_distributed.global_state, "client", None)


def _ended_peers() -> list[int]:
  """Processes that have ended (their `_end` or `_die` said so in the key-value store)."""
  client = _client()
  if client is None:
    return []
  try:
    return sorted(int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(_ENDED))
  except Exception:  # the service itself is gone: the timeout decides
    return []


def _say_ended() -> None:
  client = _client()
  if client is not None:
    with contextlib.suppress(Exception):
      client.key_value_set(f"{_ENDED}{process_index()}", "1")


@contextlib.contextmanager
def watchdog(what: str, timeout: int | None = None, peers: bool = True) -> Iterator[None]:
  """Run the body (a collective, or anything that waits for the other processes) with a limit:
  after `timeout` seconds (default `--distributed_timeout`), or once another process has ended
  (`peers`), the process ends with one line naming `what`, exit status 1."""
  limit = _state["timeout"] if timeout is None else timeout
  done = threading.Event()

  def watch():
    deadline = time.monotonic() + limit
    while not done.wait(_POLL_SECONDS):
      ended = [p for p in _ended_peers() if p != process_index()] if peers else []
      if ended:  # it waits at JAX's shutdown barrier: meet it there, so that both end cleanly
        _say_ended()
        _leave(f"process {ended[0]} ended while process {process_index()} was {what}; see "
               f"process {ended[0]}'s output for why")
      if time.monotonic() >= deadline:
        _say_ended()
        _die(f"process {process_index()} waited {limit} s for the other processes while {what}: "
             f"a process died or hangs (--distributed_timeout={limit})")

  thread = threading.Thread(target=watch, name="jaxinterp-watchdog", daemon=True)
  thread.start()
  try:
    yield
  except jax.errors.JaxRuntimeError as e:  # e.g. gloo: "Connection closed by peer"
    _say_ended()
    _die(f"process {process_index()} lost another process while {what}: "
         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
  finally:
    done.set()
    thread.join()


def _leave(message: str) -> None:
  """`_die(message)` after JAX's shutdown barrier, which the processes that ended wait at (given
  a few seconds: past them, `_die` at once)."""
  threading.Timer(_SHUTDOWN_GRACE, _die, (message,)).start()
  with contextlib.suppress(Exception):
    jax.distributed.shutdown()
  _die(message)


def _end() -> None:
  """At exit: say so, then JAX's shutdown barrier under the watchdog (a peer that never arrives
  ends this process with one line instead of a hang)."""
  if not is_distributed():
    return
  _say_ended()
  with watchdog("waiting for the other processes to finish", peers=False):
    jax.distributed.shutdown()


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, on every process (exact: raw bytes through the
  collectives, gloo's on CPU). One process: `[data]`."""
  if process_count() == 1:
    return [data]
  _state["collectives"] += 1
  with watchdog(f"gathering data (collective {_state['collectives']})"):
    sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
  return [rows[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's `data` on every process (the others pass anything, e.g. None)."""
  return allgather_bytes(data if process_index() == 0 else b"")[0]


def arrays_to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """A dict of numpy arrays as bytes (`np.savez`), for `allgather_bytes`."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def arrays_from_bytes(data: bytes) -> dict[str, np.ndarray]:
  """The dict `arrays_to_bytes` encoded."""
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def owns(i: int) -> bool:
  """Whether this process runs item `i` of the split loops (`sum_split`, `map_split`,
  `fold_split`): process p of N runs items p, p + N, ..."""
  return i % process_count() == process_index()


def n_owned(n_items: int) -> int:
  """How many of `n_items` items (batches) this process runs in `sum_split`: items p, p + N, ..."""
  return len(range(process_index(), n_items, process_count()))


def own_rows(size: int) -> tuple[np.ndarray, np.ndarray]:
  """The rows of a batch of `size` rows this process takes when a step's rows are split over the
  processes: process p of N takes rows [p * k, (p + 1) * k), k = ceil(size / N). Returns (index,
  real): int [k] row indices clamped to the batch (past its end, copies of the last row) and bool
  [k], False for those fillers. One process: every row."""
  k = -(-size // process_count())
  rows = process_index() * k + np.arange(k)
  return np.minimum(rows, size - 1), rows < size


def sum_split(items: Iterable[Any], fn: Callable[[int, Any], np.ndarray],
              total: np.ndarray) -> np.ndarray:
  """`total` plus `fn(i, item)` (a float64 array of `total`'s shape) summed over the `items`, the
  items split over the processes: process p calls `fn` for items p, p + N, ...; after every round
  of N items the round's sums are gathered (`allgather_bytes`) and added in item order on every
  process. Every process gets the sum one process gets adding the items one after the other,
  bitwise. A collective: every process iterates the same items. One process: a plain loop."""
  return fold_split(items, lambda i, item: {"sum": np.asarray(fn(i, item), np.float64)},
                    lambda acc, result: acc + result["sum"], np.array(total, np.float64))


def map_split(items: Iterable[Any], fn: Callable[[int, Any], dict[str, np.ndarray]],
              done: Callable[[int, dict[str, np.ndarray]], None] | None = None
              ) -> list[dict[str, np.ndarray]]:
  """Every item's `fn(i, item)` (a dict of numpy arrays), in item order on every process, the items
  split over the processes: process p calls `fn` for items p, p + N, ...; after every round of N
  items the round's results are gathered (`allgather_bytes`: exact) and `done(i, result)`, if
  given, is called for each of them in item order (e.g. to report or save it). For independent,
  deterministic items every process gets what one process computing them all gets, bitwise. A
  collective: every process iterates the same items. One process: a plain loop (`done` right after
  each `fn`, the results as `fn` returned them)."""
  n = process_count()
  results: list[dict[str, np.ndarray]] = []

  def add(result: dict[str, np.ndarray]) -> None:
    results.append(result)
    if done is not None:
      done(len(results) - 1, result)

  if n == 1:
    for i, item in enumerate(items):
      add(fn(i, item))
    return results
  _split_rounds(items, fn, add)
  return results


def _split_rounds(items: Iterable[Any], fn: Callable[[int, Any], dict[str, np.ndarray]],
                  add: Callable[[dict[str, np.ndarray]], None]) -> None:
  """The rounds of `map_split` and `fold_split`: process p calls `fn` for items p, p + N, ...;
  after each round of N items (and the last, partial one) every process's result is passed to
  `add` in item order."""
  n = process_count()
  mine, i = None, -1
  for i, item in enumerate(items):
    if owns(i):
      mine = fn(i, item)
    if i % n == n - 1:
      _gather_round(mine, add)
      mine = None
  if i >= 0 and i % n != n - 1:  # the last, partial round
    _gather_round(mine, add)


def _gather_round(mine: dict[str, np.ndarray] | None,
                  add: Callable[[dict[str, np.ndarray]], None]) -> None:
  """Every process's result of one round, in process order (= item order; a process past the last
  item sends nothing)."""
  for data in allgather_bytes(b"" if mine is None else arrays_to_bytes(mine)):
    if data:
      add(arrays_from_bytes(data))


def fold_split(items: Iterable[Any], fn: Callable[[int, Any], dict[str, np.ndarray]],
               fold: Callable[[Any, dict[str, np.ndarray]], Any], acc: Any) -> Any:
  """`acc` folded with every item's `fn(i, item)` (a dict of numpy arrays) in item order:
  `acc = fold(acc, result)`, the items split over the processes like `map_split` (process p calls
  `fn` for items p, p + N, ...; each round's results are gathered exactly), but only one round's
  results are held at a time. With a deterministic `fold` (e.g. float32 sums added in the order
  one process adds them) every process gets what one process gets, bitwise. A collective: every
  process iterates the same items. One process: a plain loop."""
  n = process_count()
  if n == 1:
    for i, item in enumerate(items):
      acc = fold(acc, fn(i, item))
    return acc
  box = [acc]

  def add(result: dict[str, np.ndarray]) -> None:
    box[0] = fold(box[0], result)

  _split_rounds(items, fn, add)
  return box[0]


def allreduce_sum(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's `arrays` (the same keys and shapes on each) added up in process order, on
  every process (float64 sums of the exact gathered values: the same bytes everywhere). A
  collective. One process: `arrays` as float64."""
  parts = allgather_arrays(arrays)
  return {k: functools.reduce(np.add, (np.asarray(p[k], np.float64) for p in parts))
          for k in arrays}


def allgather_arrays(arrays: dict[str, np.ndarray] | None
                     ) -> list[dict[str, np.ndarray] | None]:
  """Every process's dict of numpy arrays, or None where a process has nothing to send, in
  process order on every process (exact: `allgather_bytes`). A collective. One process:
  `[arrays]` as given."""
  if process_count() == 1:
    return [arrays]
  data = allgather_bytes(b"" if arrays is None else arrays_to_bytes(arrays))
  return [arrays_from_bytes(d) if d else None for d in data]
