"""Process plumbing for the absl binaries: shared flags defined once, configs read from flags,
`--help`, one-line errors.

* `define` defines a flag unless another module has (absl flags are process-global and binaries
  share `--model`, `--out`, ...); `value` reads it, else the calling binary's own default;
  `config(Config)` builds a pipeline's frozen config, each field from the flag of its name.
* `run(main)` replaces `app.run(main)`: `--help` lists the binary's own and the shared flags
  (`--helpfull`: every library's too); a bad flag, an `app.UsageError`, an `inputs.InputError` or
  one of the project's own `ValueError`s is one line on stderr (`prog: error: ...`), exit status 2,
  no traceback; library logging is quiet unless `--verbosity` is given; a program's process ends
  without the interpreter's teardown (`runtime.process.exit_now`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from jaxinterp.runtime import inputs, process

FLAGS = flags.FLAGS

_DEFINERS = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
             "float": flags.DEFINE_float, "bool": flags.DEFINE_bool, "enum": flags.DEFINE_enum}
_USED: dict[str, dict[str, None]] = {}  # module -> the flags it defined or uses by `define`
SHARED_MODULES = ("jaxinterp.experiments.common",)  # their flags are listed as shared in --help
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def define(kind: str, name: str, default: Any, help_text: str, **kw) -> None:
  """Define flag `--name` of `kind` ("string", "integer", "float", "bool", "enum" with
  `enum_values=`) unless it exists, and list it in the calling module's `--help`."""
  _USED.setdefault(sys._getframe(1).f_globals.get("__name__", ""), {})[name] = None
  if name not in FLAGS:
    _DEFINERS[kind](name, default, help=help_text, allow_override=True, **kw)


def value(name: str, default: Any) -> Any:
  """The flag's value if it was set (command line or assignment), else this binary's `default`."""
  return default if FLAGS[name].using_default_value else FLAGS[name].value


def given(name: str) -> bool:
  """Whether `--name` was given on the command line (or assigned, as tests do)."""
  return not FLAGS[name].using_default_value


def defaults(cls) -> dict[str, Any]:
  """{field: default} of a config dataclass: the defaults of the flags of the same names."""
  return {f.name: f.default for f in dataclasses.fields(cls)}


def config(cls, **fixed):
  """`cls(...)`, each field from the flag of its name (`value`, with the field's default), apart
  from the fields in `fixed` and those without a flag (left at their defaults)."""
  kw = {name: value(name, default) for name, default in defaults(cls).items()
        if name in FLAGS and name not in fixed}
  return cls(**kw, **fixed)


def prog_name() -> str:
  """The binary's name as typed: `find_circuit` for `python -m experiments.find_circuit`."""
  return os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else "jaxinterp"))[0]


def fail(message: str) -> None:
  """Exit with status 2 after one line on stderr: `prog: error: message`."""
  print(f"{prog_name()}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


VERBOSITY_HELP = ("Logging of the libraries (orbax, absl, jax): unset shows only warnings and "
                  "errors; 0 adds info, 1 debug.")


def _describe(flag) -> str:
  name = (f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}") + \
      (f" (-{flag.short_name})" if flag.short_name else "")
  verbosity = flag.name == "verbosity"
  text = f"{name}: {' '.join(str(VERBOSITY_HELP if verbosity else flag.help).split())}"
  if not verbosity and flag.default_as_str not in (None, "", "None"):
    text += f" (default: {flag.default_as_str})"
  return textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="      ")


def _flags_of(module: str) -> list:
  """The flags `module` defined itself (absl files `__main__`'s under its path) or by `define`."""
  found = list(FLAGS.get_flags_for_module(sys.argv[0] if module == "__main__" else module))
  found += [FLAGS[n] for n in _USED.get(module, {}) if n in FLAGS]
  return list({f.name: f for f in found}.values())


def help_text(module: str, full: bool = False) -> str:
  """The `--help` page of the binary defined in `module`: docstring, own flags, shared flags."""
  doc = (sys.modules[module].__doc__ or "").strip() if module in sys.modules else ""
  own = _flags_of(module)
  shared = [f for m in SHARED_MODULES for f in _flags_of(m) if f.name not in {g.name for g in own}]
  shared += [FLAGS[n] for n in ("verbosity",) if n in FLAGS]
  lines = [doc, "", f"flags of {prog_name()}:"] + [_describe(f) for f in own]
  lines += ["", "shared flags:"] + [_describe(f) for f in shared] + [""]
  lines += ["all flags, by module:", FLAGS.get_help()] if full else \
      ["--helpfull lists every flag, the libraries' too."]
  return "\n".join(lines).lstrip("\n") + "\n"


def _parse(module: str, argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with our `--help` and one-line parse errors; quiets library logging."""
  args = list(argv[1:])
  args = args[:args.index("--")] if "--" in args else args
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


def run(main: Callable[[list[str]], Any], module: str | None = None) -> None:
  """`app.run(main)` with our `--help`, one-line errors and quiet logging (see the module's
  docstring). `module` defines the binary's flags (default: `main`'s module)."""
  module = module or main.__module__

  def guarded(argv):
    try:
      return main(argv)
    except (app.UsageError, inputs.InputError) as e:
      fail(str(e))
    except ValueError as e:  # the project's own input errors (TaskError, GraphError, ...) read
      if not type(e).__module__.startswith(("jaxinterp", "__main__")):  # as one line too: each
        raise  # names its flag, file or value, so the class name would only be noise
      fail(str(e))
    except KeyboardInterrupt:
      print(f"{prog_name()}: interrupted", file=sys.stderr)
      sys.exit(130)

  try:
    app.run(guarded, flags_parser=lambda argv: _parse(module, argv))
  except SystemExit as e:
    process.end(e, program=module == "__main__")
