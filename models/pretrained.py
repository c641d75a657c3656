"""Porting HuggingFace checkpoints (and our own orbax conversions) into the pure-function model.

`from_pretrained(path)` reads a HF directory (`config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`) or a directory written by
`experiments/convert_checkpoint.py` (orbax params plus `jaxinterp_config.json`), and returns a
`Model`. The per-family translation of configs and tensor names is `models.convert`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig
from .convert import CheckpointError, config_from_hf, tensor_rules
from .transformer import embed_inputs, forward, init_params

CONVERTED_CONFIG = "jaxinterp_config.json"
CONVERTED_PARAMS = "params"


_PREFIXES = ("transformer.", "gpt_neox.", "model.language_model.", "model.")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".attention.bias",
                     ".attention.masked_bias")


def _strip(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      return name[len(p):]
  return name


def convert_state_dict(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                       dtype=None) -> dict[str, Any]:
  """Convert HF tensors (by HF name) into our params pytree, checking names and shapes.

  Each tensor is read (`tensors[name]`, once: a lazy mapping such as `read_hf_tensors`'s reads it
  from disk then), mapped and turned into its jax array before the next is read, so the host holds
  one tensor beside the params. `dtype`: the params' dtype; None keeps each tensor's own (a bf16
  checkpoint loads as bf16).
  """
  rules = tensor_rules(cfg)
  stripped = {_strip(name): name for name in tensors if not name.endswith(_IGNORED_SUFFIXES)}
  if cfg.tied_embeddings:  # a tied head may be saved beside the embedding, or instead of it
    embed_name = {"gpt2": "wte.weight", "gpt_neox": "embed_in.weight"}.get(cfg.family,
                                                                         "embed_tokens.weight")
    for extra in ("lm_head.weight", "embed_out.weight"):
      head = stripped.pop(extra, None)
      if head is not None and embed_name not in stripped:
        stripped[embed_name] = head
  missing = sorted(set(rules) - set(stripped))
  unexpected = sorted(set(stripped) - set(rules))
  if missing or unexpected:
    msg = []
    if missing:
      msg.append(f"missing tensors: {_fmt(missing)}")
    if unexpected:
      msg.append(f"unexpected tensors: {_fmt([stripped[u] for u in unexpected])}")
    raise CheckpointError(f"checkpoint does not match a {cfg.family} model with this "
                          "config.json; " + "; ".join(msg))
  expected = _param_shapes(cfg)
  flat: dict[tuple[str, ...], jax.Array] = {}
  for short, rule in rules.items():
    name = stripped[short]
    t = np.asarray(tensors[name])
    if not jnp.issubdtype(t.dtype, jnp.floating):
      raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}; expected a floating "
                            f"point type (float32, float16 or bfloat16)")
    for path, arr in rule(t).items():
      want = expected.get(path)
      if want is None:
        raise CheckpointError(f"tensor {name!r} maps to unknown parameter {'/'.join(path)}")
      if tuple(arr.shape) != tuple(want):
        raise CheckpointError(f"shape mismatch for {name!r} (parameter {'/'.join(path)}): expected "
                              f"{tuple(want)} from config.json, got {tuple(arr.shape)} (tensor "
                              f"shape {tuple(np.shape(t))})")
      # A host copy in the dtype, then onto the device: no compiled program per weight shape
      # (jnp.array compiles one), and the host tensor can go.
      flat[path] = jax.device_put(np.array(arr, dtype or arr.dtype))
    del t
  left = sorted("/".join(p) for p in set(expected) - set(flat))
  if left:
    raise CheckpointError(f"no tensor provides parameters: {_fmt(left)}")
  params: dict[str, Any] = {}
  for path, arr in flat.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = arr
  return params


def _fmt(names: list[str], n: int = 12) -> str:
  s = ", ".join(names[:n])
  return s + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    out[tuple(k.key for k in path)] = tuple(leaf.shape)
  return out


# --------------------------------------------------------------------------------------------------
# Reading files


# safetensors' dtype names -> numpy dtypes (bfloat16 and float8 from ml_dtypes)
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class LazyTensors(Mapping):
  """{name: tensor} over safetensors files, read from disk one tensor per `[name]` (never cached):
  only the headers are read up front, so a sharded checkpoint never sits in host memory whole."""

  def __init__(self, paths: Iterable[str]):
    self._where: dict[str, tuple[str, Any, tuple[int, ...], int, int]] = {}
    for path in paths:
      self._where.update(_safetensors_header(path))

  def __getitem__(self, name: str) -> np.ndarray:
    path, dt, shape, start, end = self._where[name]
    try:
      with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    except OSError as e:
      raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    if len(data) != end - start:
      raise CheckpointError(f"cannot read safetensors file {path}: tensor {name!r} is truncated")
    return np.frombuffer(data, dt).reshape(shape)

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def _safetensors_header(path: str) -> dict[str, tuple[str, Any, tuple[int, ...], int, int]]:
  """{name: (path, dtype, shape, start, end)} from a safetensors file's header (byte offsets into
  the file), checked against the file's size."""
  def bad(why: str) -> CheckpointError:
    return CheckpointError(f"cannot read safetensors file {path}: {why}")

  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n <= 0 or 8 + n > size:
        raise bad(f"header of {n} bytes in a file of {size}")
      header = json.loads(f.read(n))
  except OSError as e:
    raise bad(str(e)) from None
  except ValueError as e:
    raise bad(f"corrupt header: {e}") from None
  out, base, end_max = {}, 8 + n, 0
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dt, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
      raise bad(f"corrupt header entry for {name!r}") from None
    if dt not in _SAFETENSORS_DTYPES:
      raise bad(f"tensor {name!r} has unsupported dtype {dt}")
    np_dt = np.dtype(_SAFETENSORS_DTYPES[dt])
    if end - start != np_dt.itemsize * math.prod(shape) or base + end > size:
      raise bad(f"tensor {name!r} lies outside the file (truncated?)")
    out[name] = (path, np_dt, shape, base + start, base + end)
    end_max = max(end_max, end)
  if base + end_max != size:
    raise bad(f"{size - base - end_max} bytes beyond the last tensor (truncated or corrupt)")
  return out


def _read_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch pickle; install the 'torch' extra "
                          f"(pip install 'jaxinterp[torch]') or convert it to "
                          f"safetensors") from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"refusing or unable to load {path} with torch.load(weights_only=True): "
                          f"{type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  if not isinstance(sd, Mapping):
    raise CheckpointError(f"{path} does not hold a state dict (got {type(sd).__name__})")
  return {k: (v.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
              if v.dtype == torch.bfloat16 else v.detach().numpy()) for k, v in sd.items()}


def read_hf_tensors(path: str) -> Mapping[str, np.ndarray]:
  """All tensors of a HF checkpoint directory, by name, in their stored dtypes. Safetensors files
  (one, or the shards of `model.safetensors.index.json`) are read lazily, a tensor per lookup."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  binf = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(single):
    return LazyTensors([single])
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"cannot read shard index {index}: {e}") from None
    shards = []
    for shard in sorted(set(weight_map.values())):
      sp = os.path.join(path, shard)
      if not os.path.exists(sp):
        raise CheckpointError(f"shard {shard} listed in {index} does not exist")
      shards.append(sp)
    out = LazyTensors(shards)
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise CheckpointError(f"tensors listed in {index} are absent from their shards: "
                            f"{_fmt(missing)}")
    return out
  if os.path.exists(binf):
    return _read_bin(binf)
  raise CheckpointError(f"no weights in {path}: expected model.safetensors, "
                        f"model.safetensors.index.json or pytorch_model.bin")


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot parse {path}: {e}") from None


def load_tokenizer(path: str):
  """The `tokenizers.Tokenizer` in `path` (a tokenizer.json file, or a directory holding one), or
  None if there is none."""
  tp = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
  if not os.path.exists(tp):
    return None
  from tokenizers import Tokenizer
  try:
    return Tokenizer.from_file(tp)
  except Exception as e:
    raise CheckpointError(f"cannot read tokenizer {tp}: {e}") from None


# --------------------------------------------------------------------------------------------------
# The model object


@dataclasses.dataclass
class Model:
  """A loaded model: config, params pytree and (optional) tokenizer, callable on tokens.

  `m(tokens)` returns logits `[batch, pos, vocab]`; `m.forward` is the pure function
  `forward(params, tokens, **kw)` for use under `jit`/`grad`/`vmap`.
  """

  cfg: ModelConfig
  params: dict[str, Any]
  tokenizer: Any = None
  path: str | None = None

  def forward(self, params, tokens, **kw):
    """Pure forward: see `models.transformer.forward` for the keyword arguments."""
    return forward(self.cfg, params, tokens, **kw)

  def __call__(self, tokens, **kw):
    return self.forward(self.params, tokens, **kw)

  def run_with_cache(self, tokens, names: Iterable[str], **kw):
    """Logits and a {site: activation} cache for the named sites."""
    return self.forward(self.params, tokens, collect=tuple(names), **kw)

  def embed(self, tokens, attention_mask=None):
    return embed_inputs(self.cfg, self.params, tokens, attention_mask)

  def generate(self, tokens, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding (full recompute per step; for tests and small models)."""
    toks = np.asarray(tokens, np.int32)
    B, P = toks.shape
    buf = np.zeros((B, P + max_new_tokens), np.int32)
    buf[:, :P] = toks

    @jax.jit
    def step(params, buf, n):  # one compile: fixed buffer, right padding past position n
      mask = jnp.arange(buf.shape[1])[None, :] < n
      logits = forward(self.cfg, params, buf, attention_mask=jnp.broadcast_to(mask, buf.shape))
      return buf.at[:, n].set(jnp.argmax(logits[:, n - 1], -1).astype(buf.dtype))

    out = jnp.asarray(buf)
    for i in range(max_new_tokens):
      out = step(self.params, out, P + i)
    return np.asarray(out)

  def to_tokens(self, texts, prepend_bos: bool = True) -> np.ndarray:
    """Tokenise equal-length texts (TransformerLens style: BOS prepended)."""
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer")
    if isinstance(texts, str):
      texts = [texts]
    rows = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if prepend_bos:
      bos = self.cfg.bos_token_id if self.cfg.bos_token_id is not None else self.cfg.eos_token_id
      rows = [[bos] + r for r in rows]
    if len({len(r) for r in rows}) != 1:
      raise ValueError("texts tokenise to different lengths; "
                       "use jaxinterp.tasks for padded batches")
    return np.asarray(rows, np.int32)


def from_pretrained(path: str, dtype=jnp.float32) -> Model:
  """Load a HF checkpoint directory or an orbax conversion into a `Model`.

  Args:
    path: a directory with `config.json` and weights, or one written by
      `experiments/convert_checkpoint.py`.
    dtype: parameter dtype (`jnp.float32`, the default, upcasts a bf16 checkpoint exactly;
      `jnp.bfloat16`); None keeps the checkpoint's own (a bf16 checkpoint loads as bf16, read
      straight into bf16, a float32 one as float32). The binaries' default (`--dtype` unset).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  if os.path.exists(os.path.join(path, CONVERTED_CONFIG)):
    return _load_converted(path, dtype)
  hf = _read_json(os.path.join(path, "config.json"))
  cfg = config_from_hf(hf)
  params = convert_state_dict(cfg, read_hf_tensors(path), dtype)
  return Model(cfg, params, load_tokenizer(path), path)


def save_converted(model: Model, out: str) -> None:
  """Save params with orbax and the config as JSON, so `from_pretrained(out)` skips the mapping."""
  import orbax.checkpoint as ocp
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  target = os.path.join(out, CONVERTED_PARAMS)
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(target, jax.tree.map(np.asarray, model.params), force=True)
  if model.path and os.path.exists(os.path.join(model.path, "tokenizer.json")):
    import shutil
    shutil.copyfile(os.path.join(model.path, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
  tmp = os.path.join(out, CONVERTED_CONFIG + ".tmp")
  with open(tmp, "w") as f:
    json.dump(model.cfg.to_dict(), f, indent=1)
  os.replace(tmp, os.path.join(out, CONVERTED_CONFIG))


def _load_converted(path: str, dtype) -> Model:
  import orbax.checkpoint as ocp
  cfg = ModelConfig.from_dict(_read_json(os.path.join(path, CONVERTED_CONFIG)))
  try:
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(os.path.abspath(path), CONVERTED_PARAMS))
  except Exception as e:
    raise CheckpointError(f"cannot restore orbax params from {path}: {e}") from None
  expected = _param_shapes(cfg)
  got = {tuple(k.key for k in p): tuple(np.shape(v))
         for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
  if got != expected:
    bad = sorted("/".join(k) for k in set(got) ^ set(expected))
    bad += sorted(f"{'/'.join(k)}: expected {expected[k]}, got {got[k]}"
                  for k in set(got) & set(expected) if got[k] != expected[k])
    raise CheckpointError(f"orbax params in {path} do not match {CONVERTED_CONFIG}: {_fmt(bad)}")
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype or x.dtype), raw)
  return Model(cfg, params, load_tokenizer(path), path)
