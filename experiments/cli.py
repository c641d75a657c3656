"""Process plumbing for the absl binaries: shared flags defined once, `--help`, one-line errors.

(Model and data loading live in `experiments.common`.)

* `define` defines a flag only if no other module has (absl flags are process-global, and several
  binaries share `--model`, `--task`, `--out`, ...; importing two of them, as the tests do, would
  otherwise raise `DuplicateFlagError`). `value` reads it, falling back to the calling binary's own
  default when the flag was not given (another binary may have registered it with another default).
* `run(main)` replaces `app.run(main)`. `--help` (`-h`, `--helpshort`) prints the binary's docstring,
  its own flags and the shared ones (`--compilation_cache`, `--verbosity`, ...) and exits 0;
  `--helpfull` adds every library's flags. A flag parsing error, an `app.UsageError` or one of the
  project's own `ValueError`s (`TaskError`, `GraphError`, ...) is one line on stderr
  (`prog: error: ...`), exit status 2, with no help page and no traceback. Library logging (orbax,
  absl) is quiet unless `--verbosity` is given.
* `warn` prints a one-line warning on stderr.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence

from absl import app, flags, logging

from jaxinterp.runtime import inputs

FLAGS = flags.FLAGS

_DEFINERS = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
             "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}
_USED: dict[str, list[str]] = {}  # module name -> flags it defined or uses through `define`
SHARED_MODULES = ("jaxinterp.experiments.common",)  # their flags are listed as shared in --help
USAGE_EXIT = 2
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def define(kind: str, name: str, default: Any, help_text: str, **kw) -> None:
  """Define flag `--name` of `kind` ("string", "integer", "float", "bool", "enum" with
  `enum_values=`) unless it exists, and list it in the calling module's `--help`."""
  module = sys._getframe(1).f_globals.get("__name__", "")
  _USED.setdefault(module, [])
  if name not in _USED[module]:
    _USED[module].append(name)
  if name in FLAGS:
    return
  if kind == "enum":
    flags.DEFINE_enum(name, default, kw.pop("enum_values"), help_text, allow_override=True, **kw)
  else:
    _DEFINERS[kind](name, default, help_text, allow_override=True, **kw)


def value(name: str, default: Any) -> Any:
  """The flag's value if it was set (command line or assignment), else this binary's `default`."""
  flag = FLAGS[name]
  return default if flag.using_default_value else flag.value


def given(name: str) -> bool:
  """Whether `--name` was given on the command line (or assigned, as tests do)."""
  return not FLAGS[name].using_default_value


def input_file(flag: str, path: Optional[str], required: Optional[str] = None) -> Optional[str]:
  """`path` if it names a file, else a usage error naming `--flag`. An empty path is an error when
  `required` is given (the text after "--flag is required"), and is returned otherwise."""
  if not path:
    if required is not None:
      raise app.UsageError(f"--{flag} is required{required}")
    return path
  if not os.path.isfile(path):
    raise app.UsageError(f"--{flag}={path}: no such file")
  return path


warn = inputs.warn  # one line on stderr: `warning: message`


def prog_name() -> str:
  """The binary's name as typed: `find_circuit` for `python -m experiments.find_circuit`."""
  return os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else "jaxinterp"))[0]


def fail(message: str) -> None:
  """Exit with status 2 after one line on stderr: `prog: error: message`."""
  print(f"{prog_name()}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


# ------------------------------------------------------------------------------------------- help


def _absl_module_name(module: str) -> str:
  """absl files the flags of `__main__` under the script's path."""
  return sys.argv[0] if module == "__main__" else module


VERBOSITY_HELP = ("Logging of the libraries (orbax, absl, jax): unset shows only warnings and "
                  "errors; 0 adds info, 1 debug.")


def _describe(flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  if flag.short_name:
    name += f" (-{flag.short_name})"
  default = flag.default_as_str
  about = VERBOSITY_HELP if flag.name == "verbosity" else flag.help
  text = f"{name}: {' '.join(str(about).split())}"
  if flag.name == "verbosity":
    default = None
  if default not in (None, "", "None"):
    text += f" (default: {default})"
  return textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="      ")


def _flags_of(module: str) -> list:
  """The flags `module` defined itself or through `define`, in definition order."""
  seen, out = set(), []
  for f in FLAGS.get_flags_for_module(_absl_module_name(module)) + \
      [FLAGS[n] for n in _USED.get(module, []) if n in FLAGS]:
    if f.name not in seen:
      seen.add(f.name)
      out.append(f)
  return out


def help_text(module: str, full: bool = False) -> str:
  """The `--help` page of the binary defined in `module`: docstring, own flags, shared flags."""
  doc = (sys.modules[module].__doc__ or "").strip() if module in sys.modules else ""
  own = _flags_of(module)
  names = {f.name for f in own}
  shared = [f for m in SHARED_MODULES for f in _flags_of(m) if f.name not in names]
  shared += [FLAGS[n] for n in ("verbosity",) if n in FLAGS]
  lines = [doc, "", f"flags of {prog_name()}:"] + [_describe(f) for f in own]
  lines += ["", "shared flags:"] + [_describe(f) for f in shared]
  if full:
    lines += ["", "all flags, by module:", FLAGS.get_help()]
  else:
    lines += ["", "--helpfull lists every flag, the libraries' too."]
  return "\n".join(lines).lstrip("\n") + "\n"


def _parse(module: str, argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with our `--help` and one-line parse errors; quiets library logging."""
  args = list(argv[1:])
  if "--" in args:
    args = args[:args.index("--")]
  if "--helpfull" in args or any(a in HELP_ARGS for a in args):
    sys.stdout.write(help_text(module, full="--helpfull" in args))
    sys.exit(0)
  try:
    rest = FLAGS(list(argv))
  except flags.Error as e:
    fail(f"{e} (see --help)")
  if FLAGS["verbosity"].using_default_value:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  return rest


def run(main: Callable[[list[str]], Any], module: Optional[str] = None) -> None:
  """`app.run(main)` with `--help` that lists this binary's and the shared flags (exit 0), one-line
  errors (exit 2) for bad flags and `app.UsageError`, and quiet library logging.

  Args:
    main: the binary's `main(argv)`.
    module: the module defining the binary's flags (default: `main`'s module).
  """
  module = module or main.__module__

  def guarded(argv):
    try:
      return main(argv)
    except (app.UsageError, inputs.InputError) as e:
      fail(str(e))
    except ValueError as e:  # the project's own input errors (TaskError, GraphError, ...) read
      if not type(e).__module__.startswith(("jaxinterp", "__main__")):  # as one line too
        raise
      fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
      print(f"{prog_name()}: interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=lambda argv: _parse(module, argv))
