"""Feature interventions: set transcoder features and run or continue the model, as
circuit-tracer's (0.5.0) `ReplacementModel.feature_intervention` and
`feature_intervention_generate`: pure functions, one forward with interventions at named sites.

An intervention is a tuple `(layer, position, feature, value)`. `value` is the activation the
feature is *set to*; to scale a feature, set it to the factor times its clean activation
(`scaled`, as circuit-tracer's demos do). `position` (an int, negative from the end, a slice or a
sequence of ints) and `feature` (an int, a slice or a sequence) index the layer's `[pos, F]`
activations as numpy and torch do; `value` broadcasts to the entries selected. A later
intervention on the same entry replaces an earlier one.

The model keeps its real MLPs. Each layer encodes its transcoder input as it is in this run (`a`,
zero at the first `zero_positions` positions: setting a BOS feature adds `value * W_dec`) and adds
`(value - a) * W_dec` of each intervened feature to its MLP output: the change of the transcoder's
reconstruction. The rest of the MLP output (other features, error term, skip) is the real MLP's on
this run's input, so effects propagate through later MLPs. A cross-layer feature of layer `s`
writes `(value - a) * W_dec[s][:, t - s]` to every layer `t >= s`, `a` taken at layer `s`.

- `freeze_attention` (default True): every attention pattern is the clean run's (norm scales stay
  live), when there are interventions.
- `constrained_layers`: in these layers the MLP output is the clean run's plus the delta computed
  from the clean activations (and the skip connection's change), so effects do not propagate
  through their MLPs; deltas are added only there (a per-layer intervention at another layer does
  nothing; a cross-layer feature writes only to these layers); attention is frozen. When they are
  every layer, the norm scales are frozen too: the logits move by the direct effects, linearly.
- `apply_activation_function=False`: the activations returned are pre-activations.

The activations returned are the encoder's on each layer's input in the intervened run (zero at
BOS), not the values set.

Generation runs the prompt as `feature_intervention` does, keeping its keys and values, then one
position at a time with free attention and no constraints. An intervention whose position is an
open-ended slice (`slice(start, None)`) also applies at every generated position; the others apply
to the prompt only. Greedy by default (TransformerLens's `generate`, which circuit-tracer calls,
samples by default: pass `do_sample=True` and a key).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.attention import KVPrefix
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import LayerStart, embed_inputs, forward, site_names
from jaxinterp.transcoders import hooks, loading
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.plt import PerLayerTranscoders

Array = jax.Array
Transcoders = PerLayerTranscoders | CrossLayerTranscoder
Intervention = tuple  # (layer, position, feature, value)
KV = ("attn.hook_k", "attn.hook_v")


@flax.struct.dataclass
class Entries:
  """One layer's interventions, resolved: the activations set and their values, padded to a
  power of two (so that runs with similar numbers of interventions share a compilation).

  Attributes:
    pos: Int[Array, "n"], positions; feat: Int[Array, "n"], features (no entry twice).
    value: Float[Array, "n"], the values they are set to.
    valid: Bool[Array, "n"], False for the padding (which changes nothing).
  """

  pos: Array
  feat: Array
  value: Array
  valid: Array


@dataclasses.dataclass(frozen=True)
class _Options:
  """What a run does besides its interventions (static under jit)."""

  freeze_attention: bool  # with interventions to make (circuit-tracer freezes only then)
  constrained: tuple[int, ...] | None
  apply_activation_function: bool
  zero_positions: int


def _axis(index, size: int, what: str, n: int) -> tuple[np.ndarray, bool]:
  """The indices one axis selects and whether they index as numpy's advanced indices (an int or
  a sequence) rather than as a slice. `what` is 'position' or 'feature'."""
  if isinstance(index, slice):
    if index.stop is not None and not -size <= index.stop <= size:
      past = "past the prompt of" if what == "position" else "past d_transcoder ="
      raise TranscoderError(f"intervention {n}: {what} {index} is {past} {size}")
    return np.arange(size)[index], False
  idx = np.asarray(index)
  if idx.ndim > 1 or idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
    raise TranscoderError(f"intervention {n}: {what} must be an int or a sequence of ints, got "
                          f"{index!r}")
  if what == "position" and idx.size and (idx.min() < -size or idx.max() >= size):
    raise TranscoderError(f"intervention {n}: position {idx.tolist()} is past the prompt of "
                          f"{size} tokens")
  if what == "feature" and idx.size and (idx.min() < 0 or idx.max() >= size):
    raise TranscoderError(f"intervention {n}: feature {idx.tolist()} is not in [0, {size}) "
                          f"(d_transcoder)")
  return idx % size if size else idx, True


def resolve(interventions: Sequence[Intervention], n_layers: int, n_pos: int, n_features: int,
            dtype=jnp.float32) -> dict[int, Entries]:
  """Interventions as every layer's `Entries` (TranscoderError, one line, for bad input).

  Positions index a run of `n_pos` positions; an entry set twice keeps its last value. Every
  layer has the same number of entries, padded.
  """
  per_layer: dict[int, list] = {}
  for n, iv in enumerate(interventions):
    if not isinstance(iv, tuple | list) or len(iv) != 4:
      raise TranscoderError(f"intervention {n} must be (layer, position, feature, value), got "
                            f"{iv!r}")
    layer, position, feature, value = iv
    if not isinstance(layer, int | np.integer) or not 0 <= layer < n_layers:
      raise TranscoderError(f"intervention {n}: layer {layer!r} is not in [0, {n_layers})")
    p, p_adv = _axis(position, n_pos, "position", n)
    f, f_adv = _axis(feature, n_features, "feature", n)
    if not p_adv:
      p = p.reshape(p.shape + (1,) * f.ndim)
    elif not f_adv:
      f = f.reshape((1,) * p.ndim + f.shape)
    try:
      p, f = np.broadcast_arrays(p, f)
      value = jnp.broadcast_to(jnp.asarray(value, dtype), p.shape)
    except (ValueError, TypeError):
      raise TranscoderError(f"intervention {n}: position, feature and value of shapes "
                            f"{np.shape(position)}, {np.shape(feature)}, {np.shape(value)} do "
                            "not broadcast together") from None
    per_layer.setdefault(int(layer), []).append((p.ravel(), f.ravel(), value.ravel()))
  kept = {}
  for layer, parts in per_layer.items():
    p, f = (np.concatenate([x[i] for x in parts]).astype(np.int32) for i in (0, 1))
    key = p.astype(np.int64) * n_features + f
    _, last = np.unique(key[::-1], return_index=True)
    keep = np.sort(key.size - 1 - last)
    kept[layer] = (p[keep], f[keep], jnp.concatenate([x[2] for x in parts])[keep])
  n = max([8] + [len(k[0]) for k in kept.values()])
  n = 1 << (n - 1).bit_length()
  plan = {}
  for layer in range(n_layers):
    p, f, v = kept.get(layer, (np.zeros(0, np.int32), np.zeros(0, np.int32), jnp.zeros(0, dtype)))
    pad = n - len(p)
    plan[layer] = Entries(jnp.asarray(np.pad(p, (0, pad))), jnp.asarray(np.pad(f, (0, pad))),
                          jnp.pad(v, (0, pad)), jnp.asarray(np.arange(n) < len(p)))
  return plan


def scaled(activations: Array | np.ndarray, features: Sequence[tuple[int, int, int]],
           factor: float) -> list[Intervention]:
  """Interventions setting each `(layer, position, feature)` to `factor` times its activation in
  `activations` (Float[Array, "L pos F"], e.g. the clean run's from `feature_intervention` with
  no interventions): circuit-tracer's way of scaling a feature."""
  a = np.asarray(activations)
  return [(int(layer), int(p), int(f), factor * float(a[layer, p, f]))
          for layer, p, f in features]


def _pre(tc: Transcoders, layer: int, x: Array) -> Array:
  """Layer `layer`'s pre-activations. x: [pos, d_model] -> [pos, F]."""
  return x.astype(tc.dtype) @ tc.W_enc[layer] + tc.b_enc[layer]


def _act(tc: Transcoders, layer: int, pre: Array) -> Array:
  t = tc.threshold
  return jax.nn.relu(pre) if t is None else pre * (pre > t[layer]).astype(pre.dtype)


def _standardized(cfg: ModelConfig, x: Array, inv: Array) -> Array:
  """ln2's standardisation before its gain, with the inverse scale `inv` of the run."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if cfg.normalization == "layernorm":
    return (xf - jnp.mean(xf, -1, keepdims=True)) * inv
  return xf * inv


def _site_fns(cfg: ModelConfig, tc: Transcoders, plan: Mapping[int, Entries], opts: _Options,
              clean: Mapping[str, Any] | None, store: dict) -> dict[str, Callable]:
  """The site interventions of one run. `clean`: the clean run's values to freeze (patterns,
  scales, constrained layers' outputs, inputs and activations), or None for a free run. The run
  writes each layer's transcoder input to `store["in"]` and the activations it returns to
  `store["acts"]`."""
  L = cfg.n_layers
  sites = hooks.sites_for(cfg, tc.input_hook, tc.output_hook)
  known = set(site_names(cfg))
  constrained = set(opts.constrained or ())
  store.update({"in": {}, "acts": {}, "pending": {}})
  iv: dict[str, Callable] = {}

  def chain(name, fn):
    old = iv.get(name)
    iv[name] = fn if old is None else (lambda x, old=old: fn(old(x)))

  if clean is not None:
    for name, value in clean["sites"].items():
      iv[name] = lambda x, value=value: value.astype(x.dtype)

  def read(layer, x):
    store["in"][layer] = x[0]
    return x

  def standardize(layer, inv):
    store["in"][layer] = _standardized(cfg, store["in"][layer], inv[0])
    return inv

  def add(layer, pos, rows, P):  # rows [n, d_model] added at positions pos of layer's output
    delta = jnp.zeros((P, tc.d_model), tc.dtype).at[pos].add(rows)
    store["pending"][layer] = store["pending"].get(layer, 0) + delta

  def write(layer, x):
    xin = store["in"][layer]
    pre = _pre(tc, layer, xin)
    z = opts.zero_positions
    act = _act(tc, layer, pre).at[:z].set(0)
    store["acts"][layer] = act if opts.apply_activation_function else pre.at[:z].set(0)
    if layer in plan:
      e = plan[layer]
      base = clean["acts"][layer] if layer in constrained else act
      dv = jnp.where(e.valid, e.value.astype(tc.dtype) - base[e.pos, e.feat], 0)  # [n]
      w = tc.W_dec[layer][e.feat]
      if w.ndim == 2:  # per-layer: [n, d_model]
        add(layer, e.pos, dv[:, None] * w, xin.shape[0])
      else:  # cross-layer: [n, L - layer, d_model]
        w = dv[:, None, None] * w
        for t in range(layer, L):
          add(t, e.pos, w[:, t - layer], xin.shape[0])
    if layer in constrained:
      x = clean["out"][layer][None].astype(x.dtype)
      if tc.W_skip is not None:
        diff = (xin - clean["in"][layer]).astype(tc.dtype) @ tc.W_skip[layer]
        x = x + diff[None].astype(x.dtype)
    if (not constrained or layer in constrained) and layer in store["pending"]:
      x = x + store["pending"].pop(layer)[None].astype(x.dtype)
    return x

  for layer in range(L):
    chain(sites.input_at(layer), functools.partial(read, layer))
    scale = f"blocks.{layer}.ln2.hook_scale"
    if sites.standardize and scale in known:
      chain(scale, functools.partial(standardize, layer))
    chain(sites.output_at(layer), functools.partial(write, layer))
  return iv


def _frozen_names(cfg: ModelConfig, opts: _Options) -> list[str]:
  """The sites whose clean values an intervened run keeps (besides constrained outputs)."""
  names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(cfg.n_layers)]
  if opts.constrained is not None and set(range(cfg.n_layers)) <= set(opts.constrained):
    names += [n for n in site_names(cfg) if n.endswith(".hook_scale")]
  return names


def _kv_names(cfg: ModelConfig) -> tuple[str, ...]:
  return tuple(f"blocks.{layer}.{s}" for layer in range(cfg.n_layers) for s in KV)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "collect_kv"))
def _prompt_run(cfg: ModelConfig, params, tc: Transcoders, tokens: Array,
                plan: dict[int, Entries], opts: _Options, collect_kv: bool = False):
  """The intervened run of a prompt: (logits [pos, vocab], activations [L, pos, F], the keys and
  values `{site: [1, pos, kv_head, d_head]}` if `collect_kv`)."""
  L = cfg.n_layers
  sites = hooks.sites_for(cfg, tc.input_hook, tc.output_hook)
  clean = None
  if opts.freeze_attention or opts.constrained is not None:
    store: dict = {}
    names = _frozen_names(cfg, opts)
    outs = [sites.output_at(layer) for layer in opts.constrained or ()]
    iv = _site_fns(cfg, tc, {}, dataclasses.replace(opts, constrained=None), None, store)
    _, cache = forward(cfg, params, tokens[None], interventions=iv, collect=names + outs)
    acts = {layer: _act(tc, layer, _pre(tc, layer, store["in"][layer]))
            .at[:opts.zero_positions].set(0) for layer in range(L)}
    clean = {"sites": {n: cache[n] for n in names}, "in": store["in"], "acts": acts,
             "out": {layer: cache[sites.output_at(layer)][0] for layer in opts.constrained or ()}}
  store = {}
  iv = _site_fns(cfg, tc, plan, opts, clean, store)
  out = forward(cfg, params, tokens[None], interventions=iv,
                collect=_kv_names(cfg) if collect_kv else ())
  logits, cache = out if collect_kv else (out, None)
  return logits[0], jnp.stack([store["acts"][layer] for layer in range(L)]), cache


def _check(cfg: ModelConfig, tc: Transcoders, tokens, constrained_layers) -> tuple[np.ndarray,
                                                                                  tuple | None]:
  loading.check_model(tc, cfg)
  toks = np.asarray(tokens)
  if toks.ndim != 1 or toks.size == 0 or not np.issubdtype(toks.dtype, np.integer):
    raise TranscoderError(f"tokens must be one prompt's token ids [pos], got shape {toks.shape} "
                          f"of {toks.dtype}")
  if toks.size > cfg.n_ctx:
    raise TranscoderError(f"the prompt has {toks.size} tokens, more than the model's context of "
                          f"{cfg.n_ctx}")
  if toks.min() < 0 or toks.max() >= cfg.d_vocab:
    raise TranscoderError(f"token ids outside the vocabulary [0, {cfg.d_vocab})")
  if constrained_layers is None:
    return toks.astype(np.int32), None
  layers = tuple(sorted({int(x) for x in constrained_layers}))
  if layers and not 0 <= layers[0] <= layers[-1] < cfg.n_layers:
    raise TranscoderError(f"constrained_layers {list(layers)} are not all in "
                          f"[0, {cfg.n_layers})")
  return toks.astype(np.int32), layers or None


def feature_intervention(cfg: ModelConfig, params: Mapping[str, Any], transcoders: Transcoders,
                         tokens, interventions: Sequence[Intervention], *,
                         constrained_layers: Sequence[int] | None = None,
                         freeze_attention: bool = True, apply_activation_function: bool = True,
                         return_activations: bool = True,
                         zero_positions: int = 1) -> tuple[Array, Array | None]:
  """Run a prompt with transcoder features set (circuit-tracer's `feature_intervention`).

  Args:
    cfg, params: the model. transcoders: `PerLayerTranscoders` or a `CrossLayerTranscoder`.
    tokens: Int[Array, "pos"], one prompt (BOS first).
    interventions: `(layer, position, feature, value)` tuples (module doc); empty: the clean run.
    constrained_layers, freeze_attention, apply_activation_function: as circuit-tracer's (module
      doc). return_activations: False returns None for the activations.
    zero_positions: the first positions whose activations count as zero (1: BOS).

  Returns:
    (logits Float[Array, "pos vocab"] (with any softcap), activations Float[Array, "L pos F"] of
    the intervened run, zero at the first `zero_positions` positions). TranscoderError (one line)
    for bad input.
  """
  toks, layers = _check(cfg, transcoders, tokens, constrained_layers)
  plan = resolve(interventions, cfg.n_layers, toks.size, transcoders.d_transcoder,
                 transcoders.dtype)
  opts = _Options(freeze_attention and bool(interventions), layers if interventions else None,
                  apply_activation_function, zero_positions)
  logits, acts, _ = _prompt_run(cfg, params, transcoders, jnp.asarray(toks), plan, opts)
  return logits, (acts if return_activations else None)


@functools.partial(jax.jit, static_argnames=("cfg", "opts"))
def _step(cfg: ModelConfig, params, tc: Transcoders, toks: Array, kv: tuple[Array, Array],
          t: Array, plan: dict[int, Entries], opts: _Options):
  """Run position t of `toks` [T] after the cached keys and values of positions < t, with the
  open-ended interventions; return (logits [vocab], activations [L, F], the updated cache)."""
  T, L = toks.shape[0], cfg.n_layers
  resid = jax.lax.dynamic_slice_in_dim(embed_inputs(cfg, params, toks[None]), t, 1, axis=1)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L, 1, T))
  start = LayerStart(0, resid, positions=jnp.full((1, 1), t, jnp.int32),
                     kv_prefix=KVPrefix(kv[0], kv[1], pos, pos < t))
  store: dict = {}
  iv = _site_fns(cfg, tc, plan, opts, None, store)
  logits, cache = forward(cfg, params, jax.lax.dynamic_slice_in_dim(toks, t, 1)[None],
                          interventions=iv, collect=_kv_names(cfg), start=start)
  new = tuple(jnp.stack([cache[f"blocks.{layer}.{s}"][:, 0] for layer in range(L)]) for s in KV)
  kv = tuple(c.at[:, :, t].set(n.astype(c.dtype)) for c, n in zip(kv, new, strict=True))
  acts = jnp.stack([store["acts"][layer][0] for layer in range(L)])
  return logits[0, 0], acts, kv


def _next_token(logits: Array, do_sample: bool, temperature: float, top_k: int | None,
                key: Array | None) -> int:
  logits = logits.astype(jnp.float32)
  if not do_sample or temperature == 0:
    return int(jnp.argmax(logits))
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return int(jax.random.categorical(key, logits))


def feature_intervention_generate(
    cfg: ModelConfig, params: Mapping[str, Any], transcoders: Transcoders, tokens,
    interventions: Sequence[Intervention], *, max_new_tokens: int,
    constrained_layers: Sequence[int] | None = None, freeze_attention: bool = True,
    apply_activation_function: bool = True, return_activations: bool = True,
    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
    key: Array | None = None, eos_token_id: int | None = None, zero_positions: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, Array, Array | None]:
  """Continue a prompt with transcoder features set (circuit-tracer's
  `feature_intervention_generate`; module doc for which positions an intervention reaches).

  Args:
    cfg, params, transcoders, tokens, interventions, constrained_layers, freeze_attention,
      apply_activation_function, return_activations, zero_positions: as `feature_intervention`
      (freezing and constraints apply to the prompt's run only, as circuit-tracer's).
    max_new_tokens: how many tokens to generate (>= 1).
    do_sample: sample at `temperature` (0: greedy) from the `top_k` most likely tokens (None: all)
      with the PRNG `key` (required); False (default): greedy.
    eos_token_id: stop after generating this token (None: generate `max_new_tokens`).
    progress: called as `progress(done, total)` after each generated token.

  Returns:
    (tokens Int[ndarray, "pos + n"], the prompt and the n tokens generated; logits Float[Array,
    "n vocab"], the distribution each was chosen from; activations Float[Array, "L pos+n-1 F"]:
    the prompt's as `feature_intervention` returns them, then each generated position's but the
    last, or None). TranscoderError (one line) for bad input.
  """
  toks, layers = _check(cfg, transcoders, tokens, constrained_layers)
  P, F = toks.size, transcoders.d_transcoder
  if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
    raise TranscoderError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
  if P + max_new_tokens - 1 > cfg.n_ctx:
    raise TranscoderError(f"{P} prompt tokens and {max_new_tokens} new ones exceed the model's "
                          f"context of {cfg.n_ctx}")
  if do_sample and temperature != 0 and key is None:
    raise TranscoderError("do_sample=True needs a PRNG key")
  if do_sample and (temperature < 0 or (top_k is not None and not 1 <= top_k <= cfg.d_vocab)):
    raise TranscoderError(f"temperature must be >= 0 and top_k in [1, {cfg.d_vocab}], got "
                          f"{temperature}, {top_k}")
  plan = resolve(interventions, cfg.n_layers, P, F, transcoders.dtype)
  open_ended = [(iv[0], 0, iv[2], iv[3]) if isinstance(iv[1], slice) and iv[1].stop is None
                else (iv[0], slice(0, 0), iv[2], 0.0) for iv in interventions]  # same numbers
  try:
    step_plan = resolve(open_ended, cfg.n_layers, 1, F, transcoders.dtype)
  except TranscoderError as e:
    raise TranscoderError(f"{e} at a generated position") from None
  opts = _Options(freeze_attention and bool(interventions), layers if interventions else None,
                  apply_activation_function, zero_positions)
  logits, acts, cache = _prompt_run(cfg, params, transcoders, jnp.asarray(toks), plan, opts,
                                    collect_kv=True)
  T = P + max_new_tokens - 1  # the positions run: the last token generated is not
  buf = jnp.zeros((T,), jnp.int32).at[:P].set(jnp.asarray(toks))
  kv = tuple(jnp.zeros(k.shape[:2] + (T,) + k.shape[3:], k.dtype).at[:, :, :P].set(k) for k in (
      jnp.stack([cache[f"blocks.{layer}.{s}"] for layer in range(cfg.n_layers)]) for s in KV))
  step_opts = _Options(False, None, apply_activation_function, 0)
  out_logits, out_acts, new = [logits[-1]], [acts], []
  keys = jax.random.split(key, max_new_tokens) if key is not None else [None] * max_new_tokens
  for i in range(max_new_tokens):
    if i:
      t = P + i - 1
      lg, a, kv = _step(cfg, params, transcoders, buf, kv, jnp.int32(t), step_plan, step_opts)
      out_logits.append(lg)
      out_acts.append(a[:, None])
    nxt = _next_token(out_logits[-1], do_sample, temperature, top_k, keys[i])
    new.append(nxt)
    if P + i < T:
      buf = buf.at[P + i].set(nxt)
    if progress is not None:
      progress(i + 1, max_new_tokens)
    if eos_token_id is not None and nxt == eos_token_id:
      break
  tokens_out = np.concatenate([toks, np.asarray(new, np.int32)])
  activations = jnp.concatenate(out_acts, axis=1) if return_activations else None
  return tokens_out, jnp.stack(out_logits), activations
