"""Reading and writing `.safetensors` files with numpy, refusing damaged ones in one line.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
Reading it here (rather than through the `safetensors` package) gives bfloat16 through ml_dtypes
and one-line errors for truncated or inconsistent files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxinterp.transcoders.errors import TranscoderError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, as read-only numpy arrays backed by a memory map.

  Raises TranscoderError (one line) for a missing, truncated or malformed file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TranscoderError(f"{path}: no such file")
  size = os.path.getsize(path)
  if size < 8:
    raise TranscoderError(f"{path}: truncated safetensors file ({size} bytes)")
  with open(path, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > min(size - 8, _MAX_HEADER):
      raise TranscoderError(f"{path}: truncated safetensors file (header of {n} bytes, file of "
                            f"{size})")
    try:
      header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise TranscoderError(f"{path}: not a safetensors file (unreadable header)") from None
  if not isinstance(header, dict):
    raise TranscoderError(f"{path}: not a safetensors file (header is not a JSON object)")
  header.pop("__metadata__", None)
  n_data = size - 8 - n
  buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(n_data,)) if n_data else \
    np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    try:
      dtype = np.dtype(DTYPES[info["dtype"]])
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise TranscoderError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if end > n_data:
      raise TranscoderError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                            f"{end} of the data, which has {n_data})")
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
      raise TranscoderError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                            f"of {info['dtype']}")
    out[name] = buf[begin:end].view(dtype).reshape(shape)
  return out


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
  """Write `tensors` (name -> array; C order, little-endian) as a safetensors file."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for name, a in tensors.items():
    a = np.ascontiguousarray(np.asarray(a))
    if a.dtype not in _NAMES:
      raise TranscoderError(f"{name}: cannot write dtype {a.dtype} to safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for a in arrays:
      fh.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
