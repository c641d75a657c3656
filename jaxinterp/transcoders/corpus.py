"""The token rows transcoders train on: text the model samples itself (`sample`, with a KV cache),
token ids from a file (`read_token_ids`) or a tokenised text file (`read_text`).

Every function returns `(tokens, mask)`: Int[ndarray, "rows pos"] with BOS first in every row and
right padding, and Bool[ndarray, "rows pos"] (False: padding), as `training.train_transcoders`
takes them. Bad input (an empty file, ids outside the vocabulary, a row longer than the context) is
a one-line `TranscoderError` naming the flag and the file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.attention import KVPrefix
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import LayerStart, Transformer, forward
from jaxinterp.transcoders.errors import TranscoderError

Array = jax.Array
KV = ("attn.hook_k", "attn.hook_v")


def _kv_names(cfg: ModelConfig) -> tuple[str, ...]:
  return tuple(f"blocks.{layer}.{s}" for layer in range(cfg.n_layers) for s in KV)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def _sample_step(cfg: ModelConfig, params, toks: Array, kv: tuple[Array, Array], t: Array,
                 key: Array, temperature: Array, greedy: bool):
  """Run position t of every row after the cached keys and values of positions < t; write its keys
  and values into the cache and the sampled token into position t + 1."""
  B, T = toks.shape
  L = cfg.n_layers
  resid = Transformer(cfg).apply({"params": params}, toks, method=Transformer.embed)
  resid = jax.lax.dynamic_slice_in_dim(resid, t, 1, axis=1)  # [B, 1, d_model]
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L, B, T))
  prefix = KVPrefix(kv[0], kv[1], pos, pos < t)
  start = LayerStart(0, resid, positions=jnp.full((B, 1), t, jnp.int32), kv_prefix=prefix)
  logits, cache = forward(cfg, params, jax.lax.dynamic_slice_in_dim(toks, t, 1, axis=1),
                          collect=_kv_names(cfg), start=start)
  k = jnp.stack([cache[f"blocks.{i}.{KV[0]}"][:, 0] for i in range(L)])  # [L, B, K, d_head]
  v = jnp.stack([cache[f"blocks.{i}.{KV[1]}"][:, 0] for i in range(L)])
  kv = (kv[0].at[:, :, t].set(k.astype(kv[0].dtype)), kv[1].at[:, :, t].set(v.astype(kv[1].dtype)))
  last = logits[:, 0].astype(jnp.float32)  # [B, vocab]
  nxt = (jnp.argmax(last, -1) if greedy
         else jax.random.categorical(key, last / temperature, axis=-1))
  return toks.at[:, t + 1].set(nxt.astype(toks.dtype)), kv


def sample(cfg: ModelConfig, params, n_rows: int, n_pos: int, bos: int, *,
           eos: int | None = None, temperature: float = 1.0, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows of `n_pos` tokens the model samples after BOS, one position at a time with a KV cache.

  Args:
    n_rows, n_pos: the rows and their length (BOS included; at most the model's context).
    bos: the first token of every row. eos: a row ends at its first `eos` after BOS (the later
      positions are padding); None or `bos`: rows run to `n_pos`.
    temperature: the softmax temperature; 0 takes the argmax (greedy).
    progress: called as `progress(done, total)` after each position.
  Returns:
    (tokens, mask): Int[ndarray, "n_rows n_pos"], Bool[ndarray, "n_rows n_pos"].
  """
  if n_rows < 1 or n_pos < 2:
    raise TranscoderError(f"sampling needs at least 1 row of 2 tokens, got {n_rows} x {n_pos}")
  if n_pos > cfg.n_ctx:
    raise TranscoderError(f"--seq_len={n_pos} is longer than the model's context of {cfg.n_ctx}")
  if temperature < 0:
    raise TranscoderError(f"--temperature must be >= 0, got {temperature}")
  toks = jnp.full((n_rows, n_pos), bos, jnp.int32)
  shape = jax.eval_shape(lambda p, x: forward(cfg, p, x, collect=_kv_names(cfg))[1], params,
                         toks[:, :1])[f"blocks.0.{KV[0]}"]  # [B, 1, K, d_head]
  kv = tuple(jnp.zeros((cfg.n_layers, n_rows, n_pos) + shape.shape[2:], shape.dtype)
             for _ in KV)
  keys = jax.random.split(jax.random.PRNGKey(seed), n_pos - 1)
  temp = jnp.asarray(max(temperature, 1e-6), jnp.float32)
  for t in range(n_pos - 1):
    toks, kv = _sample_step(cfg, params, toks, kv, jnp.asarray(t, jnp.int32), keys[t], temp,
                            temperature == 0)
    if progress is not None:
      progress(t + 1, n_pos - 1)
  toks = np.asarray(toks, np.int64)
  mask = np.ones(toks.shape, bool)
  if eos is not None and eos != bos:
    ended = np.cumsum(toks == eos, axis=1) > 0  # at and after the first eos
    mask[:, 1:] = ~ended[:, :-1]  # the eos itself is kept
  return toks, mask


def _pad(rows: list[list[int]], bos: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  toks = np.full((len(rows), width), bos, np.int64)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    toks[i, :len(r)], mask[i, :len(r)] = r, True
  return toks, mask


def _check_rows(rows: list[list[int]], what: str, bos: int, d_vocab: int, n_ctx: int):
  rows = [r if r[0] == bos else [bos] + r for r in rows if r]
  if not rows:
    raise TranscoderError(f"{what} holds no tokens")
  for i, r in enumerate(rows):
    bad = [t for t in r if not 0 <= t < d_vocab]
    if bad:
      raise TranscoderError(f"{what}, row {i + 1}: token ids outside the vocabulary "
                            f"[0, {d_vocab}): {bad[:5]}")
    if len(r) > n_ctx:
      raise TranscoderError(f"{what}, row {i + 1}: {len(r)} tokens with BOS, more than the "
                            f"model's context of {n_ctx}")
  if all(len(r) < 2 for r in rows):
    raise TranscoderError(f"{what} holds no token after BOS to train on")
  return _pad(rows, bos)


def read_token_ids(path: str, bos: int, d_vocab: int, n_ctx: int,
                   flag: str = "--token_ids") -> tuple[np.ndarray, np.ndarray]:
  """Token rows from `path`: a `.npy` array [rows, pos] of ints, or text with one row per line
  of ids separated by spaces. BOS is prepended to a row that does not start with it."""
  what = f"{flag}={path}"
  if not os.path.isfile(path):
    raise TranscoderError(f"{what}: no such file")
  if path.endswith(".npy"):
    try:
      arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise TranscoderError(f"{what}: not a readable .npy file ({e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise TranscoderError(f"{what}: expected a 2-d integer array [rows, pos], got "
                            f"{arr.dtype} {arr.shape}")
    rows = [list(map(int, r)) for r in arr]
  else:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
      for n, line in enumerate(fh, 1):
        try:
          rows.append([int(t) for t in line.split()])
        except ValueError:
          raise TranscoderError(f"{what}, line {n}: not token ids separated by spaces") from None
  return _check_rows(rows, what, bos, d_vocab, n_ctx)


def read_text(path: str, tokenizer, bos: int, n_pos: int, d_vocab: int,
              flag: str = "--text") -> tuple[np.ndarray, np.ndarray]:
  """Token rows from a text file: each non-empty line is a document, tokenised without special
  tokens and cut into rows of at most `n_pos` tokens, each with BOS first."""
  what = f"{flag}={path}"
  if not os.path.isfile(path):
    raise TranscoderError(f"{what}: no such file")
  if tokenizer is None:
    raise TranscoderError(f"{what}: the model has no tokenizer.json; give one with --tokenizer, "
                          f"or token ids with --token_ids")
  if n_pos < 2:
    raise TranscoderError(f"--seq_len must be at least 2, got {n_pos}")
  rows = []
  with open(path, encoding="utf-8", errors="replace") as fh:
    for line in fh:
      if line.strip():
        ids = list(tokenizer.encode(line.strip(), add_special_tokens=False).ids)
        rows += [[bos] + ids[i:i + n_pos - 1] for i in range(0, len(ids), n_pos - 1)]
  if not rows:
    raise TranscoderError(f"{what} is empty (no non-blank line)")
  return _check_rows(rows, what, bos, d_vocab, n_pos)
