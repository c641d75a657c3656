"""Output files and directories that others can trust.

* Atomic files: written to a temp name beside the target, fsynced, then renamed, so a crash never
  leaves a truncated `graph.json`, `scores.npz`, CSV or PNG behind. They get the mode `open()` would
  give them (0666 less the umask), not `mkstemp`'s 0600, so collaborators can read them.
* `RunDir`: an output directory held by one run. An exclusive lock (`.lock`, naming the holder's
  PID) refuses a second concurrent run; a `DONE` file listing the outputs is written last, so a run
  killed while writing them shows as unfinished; a failed run removes the directories it created
  while they are still empty. Given the run's `RunRecord` (binary and settings, kept in
  `run.json`), it refuses a directory that holds another binary's outputs or a finished run with
  other settings (unless `overwrite`), and says when the same run is already complete.
* Arrays with a JSON record (`save_with_record` / `load_with_record`): a flat dict of arrays saved
  with orbax in a subdirectory, described by a JSON file beside it (format, shapes, metadata).
* Multi-process runs (`jax.distributed`, see `runtime.distributed`): only process 0 writes
  (`is_writer`); on the others these writers do nothing and `RunDir` checks the directory
  without holding it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

PathLike = str | os.PathLike


def atomic_write(path: PathLike, data: bytes) -> None:
  """Write `data` to `path` atomically. Raises OSError on failure (the old file stays intact)."""

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  atomic_with(path, write, suffix=".tmp")


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write(path, text.encode("utf-8"))


def atomic_savez(path: PathLike, **arrays) -> None:
  """`np.savez_compressed` to `path`, atomically."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  atomic_write(path, buf.getvalue())


def is_writer() -> bool:
  """Whether this process writes files: True unless it is one of several `jax.distributed`
  processes other than process 0 (asked without importing JAX or starting a backend)."""
  jax = sys.modules.get("jax")
  return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def atomic_with(path: PathLike, writer: Callable[[str], None], suffix: str = "") -> None:
  """Call `writer(tmp_path)` (e.g. matplotlib's savefig), then rename tmp over `path` (nothing on a
  process other than 0 of a multi-process run)."""
  if not is_writer():
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=suffix or os.path.splitext(path)[1])
  os.close(fd)
  try:
    writer(tmp)
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def default_mode() -> int:
  """The mode `open()` gives a new file: 0o666 less the process's umask."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write_json(path: PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_write_csv(path: PathLike, rows: Sequence[dict]) -> None:
  """Rows with equal keys as a CSV (header from the first row), atomically."""
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------- run directories

LOCK_FILE = ".lock"
DONE_FILE = "DONE"
RUN_FILE = "run.json"  # the `RunRecord` of the run that writes (or wrote) the directory
SHOWN_DIFFERENCES = 3  # settings named in a refusal


class OutputDirError(ValueError):
  """An output directory that cannot be used: a file is in the way, another run holds it, or it
  holds another run's outputs."""


def is_done(path: PathLike) -> bool:
  """Whether the run that wrote `path` finished writing all its outputs (its `DONE` file exists)."""
  return os.path.isfile(os.path.join(os.fspath(path), DONE_FILE))


def _normalized(settings: Any) -> Any:
  """`settings` as JSON gives it back (tuples as lists, keys as strings), so that a record read
  from `run.json` compares equal to the one that wrote it."""
  return json.loads(json.dumps(settings, sort_keys=True, default=str))


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """Which binary wrote a run directory, and with which settings (`run.json`).

  Attributes:
    binary: the binary's name (`find_circuit`, `train_das`, ...).
    settings: every setting the outputs depend on, JSON-able (a config dataclass as a dict, plus
      digests of the input files); two runs with equal settings write the same outputs.
    headline: the settings named when the run is described (`find_circuit run (method=exact,
      task=ioi)`).
  """

  binary: str
  settings: dict
  headline: tuple[str, ...] = ()

  def to_dict(self) -> dict:
    return {"binary": self.binary, "headline": list(self.headline),
            "settings": _normalized(self.settings)}

  @classmethod
  def from_dict(cls, d: Any) -> RunRecord | None:
    """The record in a parsed `run.json`, or None if it is not one."""
    if not isinstance(d, dict) or not isinstance(d.get("binary"), str) or \
        not isinstance(d.get("settings"), dict):
      return None
    return cls(d["binary"], d["settings"], tuple(d.get("headline") or ()))

  def describe(self) -> str:
    """`find_circuit run (method=exact, task=ioi, model=toy)`."""
    shown = ", ".join(f"{k}={self.settings[k]}" for k in self.headline
                      if self.settings.get(k) is not None)
    return f"{self.binary} run ({shown})" if shown else f"{self.binary} run"

  def differences(self, other: RunRecord) -> list[str]:
    """`--name: 'old' there, 'new' now` for each setting that differs (self is the old run)."""
    a, b = _normalized(self.settings), _normalized(other.settings)
    return [f"--{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def read_run_record(path: PathLike) -> RunRecord | None:
  """The `RunRecord` in directory `path`'s `run.json` (None if absent or unreadable)."""
  try:
    with open(os.path.join(os.fspath(path), RUN_FILE)) as f:
      return RunRecord.from_dict(json.load(f))
  except (OSError, ValueError):
    return None


def _listed(path: str) -> list[str]:
  """The outputs a `DONE` file lists (relative paths inside the directory; others are ignored)."""
  try:
    with open(os.path.join(path, DONE_FILE)) as f:
      names = [line.strip() for line in f if line.strip()]
  except OSError:
    return []
  return [n for n in names if not os.path.isabs(n) and ".." not in n.split(os.sep)]


def owning_run(path: PathLike) -> str | None:
  """If `path` is an output of the finished run in its directory (listed in its `DONE`), that run
  described (`find_circuit run (method=EAP, ...)`, or "finished run"), else None."""
  path = os.path.abspath(os.fspath(path))
  directory, name = os.path.split(path)
  if name not in _listed(directory):
    return None
  record = read_run_record(directory)
  return record.describe() if record is not None else "finished run"


class RunDir:
  """An output directory held by one run, as a context manager.

  On entry: refuses a path that exists and is not a directory, creates the directory (and missing
  parents), and takes an exclusive `fcntl.flock` on `.lock` inside it, which holds the PID; a second
  run on the same directory gets `OutputDirError` naming that PID. On exit the lock is released and
  removed; if the body raised, the directories this run created are removed again while they are
  empty (a failed run leaves no empty output directory behind).

  Outputs are written inside `writing(names)`, which removes a previous `DONE` first and writes
  `DONE` (listing `names`) last: a directory without `DONE` holds an unfinished run, and rerunning
  completes it.

  With a `record` (the run's binary and settings), entry also checks what the directory holds, by
  the `run.json` an earlier run left (`writing` writes this run's first, and lists it in `DONE`):
  another binary's outputs, finished or not, and a finished run with other settings (or with no
  record) are refused in one line naming that run, unless `overwrite`; a finished run with the same
  settings sets `complete` (the caller reports it and writes nothing). With `overwrite`, `writing`
  removes the previous finished run's outputs that this run does not write again.
  """

  def __init__(self, path: PathLike, record: RunRecord | None = None, overwrite: bool = False):
    self.path = os.fspath(path)
    self.record = record
    self.overwrite = overwrite
    self.complete = False  # a finished run with the same record is there already
    self._fd: int | None = None
    self._created: list[str] = []
    self._previous: list[str] = []  # outputs of the finished run that `overwrite` replaces

  def __enter__(self) -> RunDir:
    self.acquire()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.release(failed=exc_type is not None)

  def acquire(self) -> None:
    """Create the directory if needed, lock it and check what it holds (see the class
    docstring)."""
    path = self.path
    if os.path.exists(path) and not os.path.isdir(path):
      raise OutputDirError(f"{path} exists and is not a directory; choose another output directory")
    if not is_writer():  # process 0 of a multi-process run holds the directory
      self._check()
      return
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p):
      missing.append(p)
      p = os.path.dirname(p)
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise OutputDirError(f"{path}: cannot create the directory: {e.strerror or e}") from None
    self._created = missing  # deepest first
    lock = os.path.join(path, LOCK_FILE)
    while True:
      try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
      except OSError as e:
        self._remove_created()
        raise OutputDirError(f"{path}: cannot create the lock file: {e.strerror or e}") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise OutputDirError(f"{path}: cannot lock {LOCK_FILE}: {e.strerror or e}") from None
        raise OutputDirError(f"{path} is in use by another run (PID {holder}); wait for it to "
                             f"finish or choose another output directory") from None
      try:  # the holder before us may have removed the file we locked: lock the current one
        same = os.stat(lock).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    try:
      self._check()
    except BaseException:
      self.release(failed=True)
      raise

  def _check(self) -> None:
    """Refuse another binary's outputs, or a finished run with other settings (see the class
    docstring); set `complete` for a finished run with the same settings."""
    if self.record is None:
      return
    done, previous = is_done(self.path), read_run_record(self.path)
    if self.overwrite:
      self._previous = _listed(self.path) if done else []
      return
    again = "choose another output directory, or pass --overwrite to replace it"
    if previous is not None and previous.binary != self.record.binary:
      raise OutputDirError(f"{self.path} holds the outputs of another binary, "
                           f"{'a finished' if done else 'an unfinished'} {previous.describe()}; "
                           f"{again}")
    if not done:
      return  # an unfinished run of this binary: rerunning completes (or resumes) it
    if previous is None:
      raise OutputDirError(f"{self.path} holds a finished run whose settings are not recorded "
                           f"(DONE without {RUN_FILE}); {again}")
    diff = previous.differences(self.record)
    if diff:
      more = f"; {len(diff) - SHOWN_DIFFERENCES} more" if len(diff) > SHOWN_DIFFERENCES else ""
      raise OutputDirError(f"{self.path} holds a finished {previous.describe()} with other "
                           f"settings ({'; '.join(diff[:SHOWN_DIFFERENCES])}{more}); {again}")
    self.complete = True

  @contextlib.contextmanager
  def writing(self, names: Sequence[str]) -> Iterator[None]:
    """Bracket the writing of the outputs `names` (paths relative to the directory): the old `DONE`
    goes first (with `overwrite`, the previous run's outputs that are not in `names` too), then
    this run's `run.json` if it has a record; `DONE`, listing `names` (and `run.json`), is written
    when the body completes. `names` is read at the end (a list may grow in the body)."""
    if not is_writer():  # process 0 of a multi-process run writes the outputs
      yield
      return
    done = os.path.join(self.path, DONE_FILE)
    if os.path.exists(done):
      os.unlink(done)
    if self.record is not None:
      for name in self._previous:
        if name not in names and name != RUN_FILE:
          _remove(os.path.join(self.path, name))
      self._previous = []
      atomic_write_json(os.path.join(self.path, RUN_FILE), self.record.to_dict())
    yield
    missing = [n for n in names if not os.path.exists(os.path.join(self.path, n))]
    if missing:
      raise OutputDirError(f"{self.path}: outputs {missing} were not written")
    listed = ([RUN_FILE] if self.record is not None else []) + list(names)
    atomic_write_text(done, "".join(f"{n}\n" for n in listed))

  def release(self, failed: bool = False) -> None:
    """Unlock (and remove the lock file); after a failure, remove the created, empty directories."""
    if self._fd is None:
      return
    try:
      os.unlink(os.path.join(self.path, LOCK_FILE))
    except OSError:
      pass
    os.close(self._fd)  # closing releases the flock
    self._fd = None
    if failed:
      self._remove_created()

  def _remove_created(self) -> None:
    for d in self._created:
      try:
        os.rmdir(d)  # only if empty
      except OSError:
        break
    self._created = []


def _remove(path: str) -> None:
  """Remove a file or a directory tree, if there."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


# ------------------------------------------------- arrays with orbax, described by a JSON record
#
# orbax (and the jax it imports) loads on first use, not at import: `circuits/` and the viewer write
# plain files through this module and stay numpy-only.


def save_arrays(path: PathLike, tree: dict[str, Any]) -> None:
  """Save a flat dict of arrays with orbax's `PyTreeCheckpointer` at `path` (replacing what is
  there; orbax finalises the directory atomically). Keys must be plain names (no dots). Process 0
  alone of a multi-process run writes."""
  if is_writer():
    _checkpointer().save(os.path.abspath(os.fspath(path)), tree, force=True)


def load_arrays(path: PathLike) -> dict[str, Any]:
  """The dict of arrays `save_arrays` wrote at `path` (any one process may read it)."""
  return _checkpointer().restore(os.path.abspath(os.fspath(path)))


def _checkpointer():
  """orbax's PyTreeCheckpointer; in a multi-process run one of this process alone (orbax's default
  waits at barriers for every process)."""
  import orbax.checkpoint as ocp
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return ocp.PyTreeCheckpointer()
  me = jax.process_index()
  mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                          barrier_sync_key_prefix=f"jaxinterp{me}")
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                          multiprocessing_options=mp)


def read_record(path: PathLike, *, fmt: str | None, error: type[Exception],
                missing: str) -> dict:
  """A JSON record written by `save_with_record`, as a dict.

  Raises `error` with "{path} not found: {missing}" if the file is absent, "cannot parse {path}:
  ..." if it is not JSON, and "{path} has format ..., expected {fmt!r}" if its `format` key is not
  `fmt` (no check with `fmt=None`).
  """
  path = os.fspath(path)
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise error(f"{path} not found: {missing}") from None
  except ValueError as e:
    raise error(f"cannot parse {path}: {e}") from None
  if fmt is not None and record.get("format") != fmt:
    raise error(f"{path} has format {record.get('format')!r}, expected {fmt!r}")
  return record


def save_with_record(path: PathLike, tree: dict[str, Any], record: dict, *, arrays_dir: str,
                     record_file: str) -> None:
  """A directory of arrays plus their description: `tree` with orbax at `path/arrays_dir`, then
  `record` as JSON (`atomic_write_json`) at `path/record_file`, written last so that a directory
  with a record holds complete arrays. Creates `path` (and its parents)."""
  path = os.path.abspath(os.fspath(path))
  if not is_writer():
    return
  os.makedirs(path, exist_ok=True)
  save_arrays(os.path.join(path, arrays_dir), tree)
  atomic_write_json(os.path.join(path, record_file), record)


def load_with_record(path: PathLike, *, arrays_dir: str, record_file: str, fmt: str | None,
                     error: type[Exception], missing: str) -> tuple[dict[str, Any], dict]:
  """What `save_with_record` wrote: (arrays, record). The record is read first and checked as
  `read_record` does (`fmt`, `error`, `missing`)."""
  path = os.path.abspath(os.fspath(path))
  record = read_record(os.path.join(path, record_file), fmt=fmt, error=error, missing=missing)
  return load_arrays(os.path.join(path, arrays_dir)), record
