"""Attention explained: the QK attribution of one head's pre-softmax score.

Why does head `a{l}.h{h}` at query position i attend to key position j? Its score is bilinear in
the query and key inputs. Both are the residual stream `resid_pre` of layer l, which is the sum of
the outputs of the senders of the EAP-IG graph upstream of the head (`input`, every earlier head
`a{l'}.h{h'}` and MLP `m{l'}`; `models/edges.py`) plus the earlier layers' attention output biases.
With ln1's scale frozen at its value in this run (the standard linearisation, as circuit-tracer's
replacement model and the QK-circuit literature freeze it), ln1 is affine in each term: LayerNorm
centres each term and multiplies it by gamma / sigma; its bias beta is one more term. So

    q_i = sum_a Q_a(i),   k_j = sum_b K_b(j),   score(i, j) = scale * <q_i, k_j> = sum_ab T[a, b]

where the query terms a are the senders' contributions, `b_O` (the attention output biases of
layers < l, when the model has them), `ln1.b` (the norm's bias, LayerNorm only) and `b_Q`; the key
terms b the same with `b_K`. A frozen qk-norm scale multiplies each term the same way; rotary
rotates each query term at position i and each key term at j (the rotation is linear). T is the
table: its entries sum to the model's score before softmax (before any soft-cap) to float
tolerance. Key-side terms that are the same at every key position (`ln1.b`, `b_K`, `b_O`) do not
change the pattern; the per-key sender terms do.

With transcoders (`jaxinterp.transcoders`), each MLP sender `m{t}` is split into its transcoder
features `m{s}.f{k}` (feature k of layer s's transcoder, its activation times its decoder vector to
layer t; a cross-layer transcoder's feature writes to several MLPs), `m{t}.b_dec` (the decoder bias
and any skip connection) and `m{t}.error` (the MLP output minus the reconstruction). Only active
features (activation != 0) get a row.

`explain_attention` gives the table of one (head, query, key); `explain_keys` every key position of
a query at once; `explain_patching` the change of the score and the pattern between a clean and a
corrupted prompt, as the difference of the two tables (terms aligned by name).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.circuits.layout import layout_for, shape_key
from jaxinterp.models import edges as E
from jaxinterp.models import rope
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.transcoders import hooks, loading

# Terms that are the same at every key position (they shift every score of a query equally).
CONSTANT_KEY_TERMS = ("b_O", "ln1.b", "b_K")


class QKError(ValueError):
  """A head, position or prompt that the QK attribution cannot explain (one line)."""


@dataclasses.dataclass(frozen=True)
class QKTable:
  """The sender x sender decomposition of one pre-softmax attention score.

  Attributes:
    head: the head's EAP-IG name, `a{l}.h{h}`.
    query, key: the query and key positions.
    query_names, key_names: the terms' names (EAP-IG sender names, then the bias terms).
    table: Float[ndarray, "query_term key_term"], score units; `table.sum()` equals `score`.
    score: the model's pre-softmax score (before any soft-cap), from its own q and k.
    pattern: the attention probability of the key at the query.
  """

  head: str
  query: int
  key: int
  query_names: tuple[str, ...]
  key_names: tuple[str, ...]
  table: np.ndarray
  score: float
  pattern: float

  def query_totals(self) -> dict[str, float]:
    """Each query term's contribution summed over the key terms."""
    return dict(zip(self.query_names, self.table.sum(1).tolist(), strict=True))

  def key_totals(self) -> dict[str, float]:
    """Each key term's contribution summed over the query terms."""
    return dict(zip(self.key_names, self.table.sum(0).tolist(), strict=True))

  def top(self, k: int = 10) -> list[tuple[str, str, float]]:
    """The k largest entries by |value|: (query term, key term, value)."""
    flat = np.argsort(-np.abs(self.table), axis=None, kind="stable")[:k]
    rows, cols = np.unravel_index(flat, self.table.shape)
    return [(self.query_names[a], self.key_names[b], float(self.table[a, b]))
            for a, b in zip(rows, cols, strict=True)]

  def summary(self, k: int = 10) -> str:
    """A printable report: the score, the pattern and the top-k entries and key terms."""
    lines = [f"{self.head}: query {self.query} -> key {self.key}: score {self.score:+.4f} "
             f"(table sum {float(self.table.sum()):+.4f}), pattern {self.pattern:.4f}",
             f"top {k} (query term x key term), score units:"]
    lines += [f"  {q:<18} x {kk:<18} {v:+.4f}" for q, kk, v in self.top(k)]
    totals = sorted(self.key_totals().items(), key=lambda t: -abs(t[1]))[:k]
    lines.append("key terms (summed over the query terms):")
    lines += [f"  {n:<18} {v:+.4f}" for n, v in totals]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class QKPatching:
  """The change of one attention score and pattern entry between a clean and a corrupted prompt.

  Attributes:
    clean, corrupted: the two tables.
    delta: clean - corrupted on the union of their terms (a missing term counts 0); its `score`
      and `pattern` are the differences.
  """

  clean: QKTable
  corrupted: QKTable
  delta: QKTable

  def summary(self, k: int = 10) -> str:
    """The clean and corrupted scores and the top-k entries of the difference table."""
    return (f"clean score {self.clean.score:+.4f} (pattern {self.clean.pattern:.4f}), corrupted "
            f"{self.corrupted.score:+.4f} (pattern {self.corrupted.pattern:.4f})\n"
            f"difference (clean - corrupted):\n{self.delta.summary(k)}")


def parse_head(cfg: ModelConfig, head: str | tuple[int, int]) -> tuple[int, int]:
  """(layer, head) from `a{l}.h{h}` or a pair; a QKError naming it when out of range."""
  if isinstance(head, str):
    m = re.fullmatch(r"a(\d+)\.h(\d+)", head.strip())
    if not m:
      raise QKError(f"head {head!r}: expected a name like 'a1.h0'")
    layer, h = int(m.group(1)), int(m.group(2))
  else:
    layer, h = (int(x) for x in head)
  if not (0 <= layer < cfg.n_layers and 0 <= h < cfg.n_heads):
    raise QKError(f"head a{layer}.h{h} is not in the model ({cfg.n_layers} layers of "
                  f"{cfg.n_heads} heads)")
  return layer, h


def _position(name: str, p: int, n: int) -> int:
  q = p + n if p < 0 else p
  if not 0 <= q < n:
    raise QKError(f"{name} position {p} is outside the prompt (length {n})")
  return q


_forward = jax.jit(forward, static_argnames=("cfg", "collect"))  # compiled once per shape


def _final_qk_sites(cfg, layer: int) -> tuple[str, str]:
  """The sites holding the head inputs' final q and k (after qk-norm and rotary)."""
  p = f"blocks.{layer}.attn."
  if cfg.positional == "rotary":
    return p + "hook_rot_q", p + "hook_rot_k"
  if cfg.qk_norm != "none":
    return p + "hook_q_normed", p + "hook_k_normed"
  return p + "hook_q", p + "hook_k"


def _run(cfg, params, tokens, layer: int, transcoders):
  """One forward collecting the senders, the layer's residual input, q, k and the pattern (numpy,
  float64)."""
  p = f"blocks.{layer}."
  names = ["hook_senders", p + "hook_resid_pre", p + "attn.hook_pattern", p + "attn.hook_q",
           p + "attn.hook_k", *_final_qk_sites(cfg, layer)]
  tc_sites = None
  if transcoders is not None:
    tc_sites = hooks.sites_for(cfg, transcoders.input_hook, transcoders.output_hook)
    for t in range(transcoders.n_layers):
      names.append(tc_sites.input_at(t))
      if tc_sites.standardize:
        names.append(f"blocks.{t}.ln2.hook_scale")
  _, cache = _forward(cfg, params, jnp.asarray(tokens)[None], edges=E.EdgePatch(None, None),
                      collect=tuple(dict.fromkeys(names)))
  return {k: np.asarray(v[0], np.float64) for k, v in cache.items()}, tc_sites


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _norm_terms(cfg, ln: Mapping[str, Any], resid, terms):
  """ln1 applied to each term with the scale frozen at `resid`'s: [pos, T, d] (+ beta, or None)."""
  if cfg.normalization == "none" or not cfg.pre_norms or "w" not in ln:
    return terms, None
  w = _np(ln["w"])
  if cfg.normalization == "rmsnorm":
    inv = 1.0 / np.sqrt(np.mean(resid * resid, -1, keepdims=True) + cfg.norm_eps)
    return terms * inv[:, None] * (w + 1.0 if cfg.rmsnorm_plus_one else w), None
  inv = 1.0 / np.sqrt(np.var(resid, -1, keepdims=True) + cfg.norm_eps)
  return (terms - terms.mean(-1, keepdims=True)) * inv[:, None] * w, _np(ln["b"])


def _qk_scale(cfg, x, w):
  """The frozen qk-norm factor of projections x [pos, heads, d_head] (as `norms.qk_norm`)."""
  w = _np(w)
  if w.shape[0] != x.shape[1]:
    w = np.repeat(w, x.shape[1] // w.shape[0], 0)
  axes = (-1,) if cfg.qk_norm == "head" else (-2, -1)
  inv = 1.0 / np.sqrt(np.mean(x * x, axes, keepdims=True) + cfg.norm_eps)
  return inv * (w + 1.0 if cfg.rmsnorm_plus_one else w)  # [pos, heads, d_head]


def _rotate(cfg, layer: int, x, positions, n_pos: int):
  """Rotary (rotate-half, as `rope.apply_rotary`) of each term x [n, T, d_head] at its row's
  position (positions [n]): a linear map per position."""
  if cfg.positional != "rotary":
    return x
  seq_len = jnp.asarray(n_pos) if rope.rope_type(cfg) in ("dynamic", "longrope") else None
  inv, factor = rope.rotary_inv_freq(cfg, seq_len, layer in cfg.sliding_layers)
  inv = np.asarray(inv, np.float32)  # the model's angles are float32
  angles = positions[:, None].astype(np.float32) * inv
  angles = _np(np.concatenate([angles, angles], -1))[:, None]  # [n, 1, dim]
  cos, sin = np.cos(angles) * factor, np.sin(angles) * factor
  dim, half = cfg.rotary_dim, cfg.rotary_dim // 2
  rot = x[..., :dim]
  rotated = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
  return np.concatenate([rot * cos + rotated * sin, x[..., dim:]], -1)


def _mlp_split(cfg, run, tc, tc_sites, layer: int, positions: np.ndarray):
  """Transcoder terms of the MLP senders of layers < `layer` at `positions`: (names, [n, T, d])."""
  L = min(layer, tc.n_layers)
  xs = []
  for t in range(tc.n_layers):
    x = run[tc_sites.input_at(t)]
    if tc_sites.standardize:
      inv = run[f"blocks.{t}.ln2.hook_scale"]
      x = (x - x.mean(-1, keepdims=True)) * inv if cfg.normalization == "layernorm" else x * inv
    xs.append(x)
  x = jnp.asarray(np.stack(xs), tc.dtype)  # [L_tc, pos, d]
  f = np.asarray(tc.encode(x), np.float64)[:, positions]  # [L_tc, n, F]
  recon = _np(tc.decode(jnp.asarray(f, tc.dtype), x[:, positions]))
  cross = not isinstance(tc.W_dec, jax.Array | np.ndarray)

  def write(s_: int, k: int, t: int) -> np.ndarray:  # feature (s_, k)'s decoder row into m{t}
    return _np(tc.W_dec[s_][k, t - s_]) if cross else _np(tc.W_dec[s_][k])

  names, vecs = [], []
  features = np.zeros_like(recon[:L])
  for s_ in range(L):
    for k in np.nonzero(np.any(f[s_] != 0, 0))[0]:
      out = [f[s_][:, k, None] * write(s_, k, t) for t in (range(s_, L) if cross else [s_])]
      for t, o in zip(range(s_, L) if cross else [s_], out, strict=True):
        features[t] += o
      names.append(f"m{s_}.f{k}")
      vecs.append(sum(out))
  for t in range(L):
    names += [f"m{t}.b_dec", f"m{t}.error"]
    mlp_out = run["hook_senders"][positions, E.mlp_sender(cfg, t)]
    vecs += [recon[t] - features[t], mlp_out - recon[t]]
  return names, np.stack(vecs, 1)


def _terms(cfg, params, run, layer: int, positions: np.ndarray, side: str, h: int, tc, tc_sites):
  """The named terms of the head's q (side "q") or k ("k") input at `positions`: (names,
  Float[ndarray, "n_pos term d_head"] after projection, qk-norm and rotary)."""
  blk = params[f"blocks_{layer}"]
  graph = layout_for(shape_key(cfg))
  n_up = E.n_upstream_of_attn(cfg, layer)
  senders = run["hook_senders"][positions, :n_up]  # [n, S_up, d]
  resid = run[f"blocks.{layer}.hook_resid_pre"][positions]
  names = list(graph.sender_names[:n_up])
  parts = [senders]
  if tc is not None and min(layer, tc.n_layers) > 0:
    tc_names, tc_vecs = _mlp_split(cfg, run, tc, tc_sites, layer, positions)
    mlps = {E.mlp_sender(cfg, t) for t in range(min(layer, tc.n_layers))}
    keep = [i for i in range(n_up) if i not in mlps]
    names = [names[i] for i in keep] + tc_names
    parts = [senders[:, keep], tc_vecs]
  if cfg.attn_out_bias and layer > 0:  # resid_pre minus the senders: the earlier layers' b_O
    names.append("b_O")
    parts.append((resid - senders.sum(1))[:, None])
  normed, beta = _norm_terms(cfg, blk.get("ln1", {}), resid, np.concatenate(parts, 1))
  if beta is not None:
    names.append("ln1.b")
    normed = np.concatenate([normed, np.broadcast_to(beta, normed[:, :1].shape)], 1)
  a = blk["attn"]
  idx = h if side == "q" else h // (cfg.n_heads // cfg.kv_heads)
  y = normed @ _np(a["W_Q" if side == "q" else "W_K"][idx])
  if cfg.attn_bias:
    names.append("b_Q" if side == "q" else "b_K")
    b = _np(a["b_Q" if side == "q" else "b_K"][idx])
    y = np.concatenate([y, np.broadcast_to(b, y[:, :1].shape)], 1)
  if cfg.qk_norm != "none":
    full = run[f"blocks.{layer}.attn.hook_{side}"][positions]  # [n, heads, d_head]
    y = y * _qk_scale(cfg, full, a[f"{side}_norm"])[:, idx, None]
  return names, _rotate(cfg, layer, y, positions, run["hook_senders"].shape[0])


def _check_tokens(cfg, tokens) -> np.ndarray:
  t = np.asarray(tokens)
  if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
    raise QKError(f"tokens must be one prompt, a 1-D integer array, got shape {t.shape}")
  if t.min() < 0 or t.max() >= cfg.d_vocab:
    raise QKError(f"token id {int(t.max()) if t.max() >= cfg.d_vocab else int(t.min())} is "
                  f"outside the vocabulary (size {cfg.d_vocab})")
  if cfg.positional == "learned" and t.size > cfg.n_ctx:
    raise QKError(f"the prompt has {t.size} tokens, more than the model's context of {cfg.n_ctx}")
  return t


def explain_keys(cfg: ModelConfig, params: Mapping[str, Any], tokens, head: str | tuple[int, int],
                 query: int, keys: Sequence[int] | None = None, *,
                 transcoders=None) -> list[QKTable]:
  """The QK tables of `head` at position `query` for each key in `keys` (default: every position
  the query attends to), from one forward. `tokens`: Int[ndarray, "pos"], one prompt (BOS first);
  negative positions count from the end. `transcoders`: split the MLP senders into features."""
  t = _check_tokens(cfg, tokens)
  layer, h = parse_head(cfg, head)
  n = len(t)
  i = _position("query", query, n)
  if keys is None:
    lo = i - cfg.sliding_window + 1 if cfg.sliding_window and layer in cfg.sliding_layers else 0
    keys = range(max(lo, 0), i + 1) if cfg.causal else range(n)
  js = [_position("key", k, n) for k in keys]
  for j in js:
    if cfg.causal and j > i:
      raise QKError(f"key position {j} is after query position {i}: the causal mask hides it")
    if cfg.sliding_window and layer in cfg.sliding_layers and i - j >= cfg.sliding_window:
      raise QKError(f"key position {j} is outside a{layer}'s sliding window "
                    f"({cfg.sliding_window}) of query position {i}")
  if transcoders is not None:
    loading.check_model(transcoders, cfg)
  run, tc_sites = _run(cfg, params, t, layer, transcoders)
  pattern = np.asarray(run[f"blocks.{layer}.attn.hook_pattern"][h, i], np.float32)
  q_names, q_terms = _terms(cfg, params, run, layer, np.asarray([i]), "q", h, transcoders, tc_sites)
  k_names, k_terms = _terms(cfg, params, run, layer, np.asarray(js), "k", h, transcoders, tc_sites)
  scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.d_head)
  tables = np.einsum("ae,kbe->kab", q_terms[0], k_terms) * scale
  q_site, k_site = _final_qk_sites(cfg, layer)  # the model's own q and k: the score's reference
  kv = h // (cfg.n_heads // cfg.kv_heads)
  scores = run[k_site][js, kv] @ run[q_site][i, h] * scale
  name = f"a{layer}.h{h}"
  return [QKTable(name, i, j, tuple(q_names), tuple(k_names), tables[n_], float(scores[n_]),
                  float(pattern[j])) for n_, j in enumerate(js)]


def explain_attention(cfg: ModelConfig, params: Mapping[str, Any], tokens,
                      head: str | tuple[int, int], query: int, key: int, *,
                      transcoders=None) -> QKTable:
  """The QK table of `head` (`a{l}.h{h}` or (l, h)) at `query` and `key` for one prompt (see the
  module doc): `table.sum()` is the pre-softmax score. Raises QKError on a bad head or position."""
  return explain_keys(cfg, params, tokens, head, query, [key], transcoders=transcoders)[0]


def difference(a: QKTable, b: QKTable) -> QKTable:
  """a - b on the union of their terms (a term missing from one counts 0)."""
  qn = tuple(dict.fromkeys(a.query_names + b.query_names))
  kn = tuple(dict.fromkeys(a.key_names + b.key_names))

  def embed(t: QKTable) -> np.ndarray:
    out = np.zeros((len(qn), len(kn)))
    qi = [qn.index(n) for n in t.query_names]
    ki = [kn.index(n) for n in t.key_names]
    out[np.ix_(qi, ki)] = t.table
    return out

  return QKTable(a.head, a.query, a.key, qn, kn, embed(a) - embed(b), a.score - b.score,
                 a.pattern - b.pattern)


def explain_patching(cfg: ModelConfig, params: Mapping[str, Any], clean, corrupted,
                     head: str | tuple[int, int], query: int, key: int, *,
                     transcoders=None) -> QKPatching:
  """The QK tables of a clean and a corrupted prompt (the same length) and their difference: how
  each (query term, key term) pair changes the score, and the pattern's change."""
  c, k = np.asarray(clean), np.asarray(corrupted)
  if c.shape != k.shape:
    raise QKError(f"clean and corrupted prompts differ in length ({c.shape} vs {k.shape})")
  a = explain_attention(cfg, params, c, head, query, key, transcoders=transcoders)
  b = explain_attention(cfg, params, k, head, query, key, transcoders=transcoders)
  return QKPatching(a, b, difference(a, b))


def rank_key_senders(tables: Sequence[QKTable], k: int = 10,
                     include_constant: bool = False) -> list[tuple[str, int, float]]:
  """Why the head attends where it does: (key term, key position, contribution summed over the
  query terms), highest first, over the tables of `explain_keys`. Terms equal at every key
  (`CONSTANT_KEY_TERMS`), which do not move the pattern, are left out unless `include_constant`."""
  out = [(n, t.key, v) for t in tables for n, v in t.key_totals().items()
         if include_constant or n not in CONSTANT_KEY_TERMS]
  return sorted(out, key=lambda r: -r[2])[:k]



def check_line(t: QKTable, what: str = "the table") -> str:
  """One line stating whether the table sums to the score: both, and their difference."""
  diff = float(t.table.sum()) - t.score
  ok = "ok" if abs(diff) <= 1e-4 * max(1.0, abs(t.score)) else "MISMATCH"
  return (f"check: {what} ({len(t.query_names)} x {len(t.key_names)} terms) sums to "
          f"{t.table.sum():+.6f}, the score is {t.score:+.6f}: difference {diff:+.1e} ({ok})")


def report(t: QKTable, k: int = 10) -> str:
  """The top-k entries, each side's top-k totals (summed over the other side) and the bias terms
  (`b_*`, `ln1.b`) of both sides, one per line or section."""
  lines = [f"top {k} entries (query term x key term):"]
  lines += [f"  {q:<16} x {kt:<16} {x:+.4f}" for q, kt, x in t.top(k)]
  totals = {"query": t.query_totals(), "key": t.key_totals()}
  for side, tot in totals.items():
    lines.append(f"{side} terms (summed over the other side): " + ", ".join(
        f"{n} {x:+.4f}" for n, x in sorted(tot.items(), key=lambda a: -abs(a[1]))[:k]))
  bias = [f"{n} ({side}) {x:+.4f}" for side, tot in totals.items() for n, x in tot.items()
          if n.startswith("b_") or n == "ln1.b"]
  return "\n".join(lines + ["bias terms: " + (", ".join(bias) or "none")])


def top_grid(t: QKTable, k: int = 10) -> tuple[np.ndarray, list[str], list[str]]:
  """The table reduced to each side's k terms of most total |entry| (in the table's order), the
  side's other nonzero terms summed in one last "other (n)" row or column; terms that are 0
  throughout are left out, so the grid still sums to the score. (values [rows, cols], row names,
  column names)."""
  sides = []
  for axis in (1, 0):
    mass = np.abs(t.table).sum(axis)
    order = [i for i in np.argsort(-mass, kind="stable").tolist() if mass[i] > 0]
    sides.append([[i] for i in sorted(order[:k])] + ([order[k:]] if order[k:] else []))
  values = np.array([[t.table[np.ix_(a, b)].sum() for b in sides[1]] for a in sides[0]])
  names = [[ns[g[0]] if len(g) == 1 else f"other ({len(g)})" for g in groups]
           for ns, groups in ((t.query_names, sides[0]), (t.key_names, sides[1]))]
  return values.reshape(len(sides[0]), len(sides[1])), names[0], names[1]
