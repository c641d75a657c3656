"""The command-line options of `find_circuit`'s methods, generated from their options dataclasses.

Each field of each registered method's options (`attribution.METHODS`) is one flag, once, whatever
the number of methods having it; its help comes from the field's `metadata["help"]` or the
`Attributes:` section of the options' docstring, its choices from `metadata["choices"]`. Optimal
ablation's `OptimalOptions` are flags the same way. Adding a method with options adds its flags
without touching the binary. Every generated flag defaults to None (the method's own default):
a flag given to a method without that option is refused (`pipeline.check`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from jaxinterp import attribution as A
from jaxinterp.attribution import optimal

# Option fields that are no flag: set by the driver (progress), taken from the run's own settings
# (`attribution.SHARED_SETTINGS`, and optimal ablation's batch), or not a scalar (members).
NOT_FLAGS = frozenset({"progress", "members", "oa_batch", *A.SHARED_SETTINGS})
KINDS = {"int": "integer", "float": "float", "str": "string", "bool": "bool"}


@dataclasses.dataclass(frozen=True)
class OptionFlag:
  """One generated flag.

  Attributes:
    name: the option's (and the flag's) name.
    kind: "integer", "float", "string", "bool" or "enum" (`experiments.cli.define`'s kinds).
    help: its help text: who has it, what it does, the defaults.
    choices: the allowed values of an "enum".
    owners: the names of the methods having it (("optimal ablation",) for `OptimalOptions`).
  """

  name: str
  kind: str
  help: str
  choices: tuple[str, ...] | None = None
  owners: tuple[str, ...] = ()


def documented(cls: type) -> dict[str, str]:
  """The `Attributes:` entries of `cls`'s docstrings (its own first, then its bases'), as
  {field name: one-line text}; an entry `a, b: text` documents both."""
  out: dict[str, str] = {}
  for klass in cls.__mro__:
    doc = klass.__doc__ or ""
    if "Attributes:" not in doc:
      continue
    names, text = None, []
    for line in doc.split("Attributes:", 1)[1].splitlines() + ["    end: "]:
      entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
      if entry or not line.strip():
        if names:
          for n in names:
            out.setdefault(n, " ".join(text))
        names, text = (entry.group(1).split(", "), [entry.group(2)]) if entry else (None, [])
      elif names:
        text.append(line.strip())
  return out


def _kind(field: dataclasses.Field) -> str | None:
  """The flag kind of a field from its annotation (None: not a scalar, no flag)."""
  if "choices" in field.metadata:
    return "enum"
  t = str(field.type).replace("Optional[", "").replace("]", "").replace(" | None", "")
  return KINDS.get(t.strip())


def _defaults(fields: list[tuple[str, dataclasses.Field]]) -> str:
  """" (default 5)", " (default 5 (UGS); 32 (edge-pruning))", or "" when no owner has one."""
  values: dict[str, list[str]] = {}
  for owner, f in fields:
    if f.default not in (dataclasses.MISSING, None):
      values.setdefault(repr(f.default), []).append(owner)
  if len(values) <= 1:
    return "".join(f" (default {v})" for v in values)
  return " (default " + "; ".join(f"{v} ({', '.join(o)})" for v, o in values.items()) + ")"


def option_flags(owners: Iterable[tuple[str, type]]) -> list[OptionFlag]:
  """One `OptionFlag` per field of the options classes of `owners` ((name, options class) pairs),
  in order of first appearance, except the fields in NOT_FLAGS and non-scalar ones."""
  owners = list(owners)
  seen: dict[str, list] = {}
  for owner, cls in owners:
    docs = documented(cls)
    for f in dataclasses.fields(cls):
      if f.name not in NOT_FLAGS and _kind(f) is not None:
        seen.setdefault(f.name, []).append((owner, f, docs.get(f.name, "")))
  flags = []
  for name, uses in seen.items():
    f = uses[0][1]
    who = tuple(owner for owner, _, _ in uses)
    text = f.metadata.get("help") or uses[0][2]
    scope = "" if len(who) == len(owners) > 1 else f"{', '.join(who)}: "
    text = text if scope else text[:1].upper() + text[1:]
    help_text = f"{scope}{text}{_defaults([(o, x) for o, x, _ in uses])}"
    choices = tuple(f.metadata["choices"]) if "choices" in f.metadata else None
    flags.append(OptionFlag(name, _kind(f), help_text, choices, who))
  return flags


def method_flags() -> list[OptionFlag]:
  """The flags of the registered methods' options."""
  return option_flags((m.name, m.options) for m in A.METHODS.values())


def optimal_flags() -> list[OptionFlag]:
  """The flags of optimal ablation's options (`--intervention=optimal`), but those every method
  has (remat, level: they are the method's)."""
  common = {f.name for f in dataclasses.fields(A.Options)}
  return [f for f in option_flags([("--intervention=optimal", optimal.OptimalOptions)])
          if f.name not in common]
