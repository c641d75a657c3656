"""Byte sizes as flags give them (`--device_memory=80GB`, `--memory_budget=2GiB`) and as reports
print them. Imports nothing of jaxinterp, so option classes can validate sizes."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class SizeError(ValueError):
  """A size that is not a positive number of bytes (one line naming the flag)."""


def parse_bytes(text: str, flag: str = "device_memory") -> int:
  """Bytes of a size such as `80GB` (10^9), `80GiB` (2^30), `512MB`, `8e10`; SizeError else."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
  if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
    raise SizeError(f"--{flag}={text}: expected a positive size such as 80GB, 80GiB or 512MB")
  return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float) -> str:
  """`12.3 GB` (decimal units, as device memory is quoted)."""
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def round_up(n: float) -> str:
  """A size rounded up to 3 significant digits, in the form `parse_bytes` reads (`1.24MB`)."""
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      digits = max(0, 2 - int(math.floor(math.log10(n / size))))
      return f"{math.ceil(n / size * 10 ** digits) / 10 ** digits:g}{unit}"
  return f"{max(1, math.ceil(n))}B"
