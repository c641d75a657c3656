"""HF `config.json` and tensor names to our config and parameter paths, family by family.

A family here is a set of `ModelConfig` fields (`config_from_hf`) and a weight mapping
(`tensor_rules`); the forward has no per-family code. A config field we cannot translate exactly
(an unknown RoPE type or parameter, bidirectional attention, ...) is refused in one line naming it,
rather than guessed. docs/models.md lists every family's fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import rope as R
from .config import ModelConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message names the file, tensor or key at fault."""


SUPPORTED = ("gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text",
             "olmo2", "phi3")
# model_type -> our family name, for the decoders that share the Llama layout.
_LLAMA_LIKE = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "qwen3": "qwen3",
               "mistral": "mistral", "gemma3_text": "gemma3", "olmo2": "olmo2", "phi3": "phi3"}


# --------------------------------------------------------------------------------------------------
# Config translation


def _refuse(field: str, value: Any, why: str) -> CheckpointError:
  return CheckpointError(f"config.json field {field} = {value!r}: {why}; refusing to guess")


def _rope_items(params: dict[str, Any], hf: Mapping[str, Any], field: str):
  """Validated scaling items (None for plain RoPE) with HF's derived values filled in."""
  kind = params.get("rope_type", params.get("type")) or "default"
  if kind not in R.ROPE_TYPES:
    raise _refuse(f"{field}.rope_type", kind, f"supported: {', '.join(R.ROPE_TYPES)}")
  allowed = set(R.ROPE_TYPES[kind]) | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
  for key in sorted(params):
    if key not in allowed:
      raise _refuse(f"{field}.{key}", params[key], f"not a parameter of rope_type {kind!r}")
  s = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
  if kind == "default":
    return None
  if kind in ("llama3", "yarn", "longrope"):  # as HF's standardize_rope_params
    if hf.get("original_max_position_embeddings") is not None:
      s["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    else:
      s.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
  if kind == "dynamic":
    s["max_position_embeddings"] = hf["max_position_embeddings"]
  if kind in ("yarn", "longrope"):
    orig = s["original_max_position_embeddings"]
    if s.get("factor") is None:
      s["factor"] = hf["max_position_embeddings"] / orig
    f = s["factor"]
    if s.get("attention_factor") is None:
      if kind == "yarn":
        def mscale(scale, m=1):
          return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        ms, msa = s.get("mscale"), s.get("mscale_all_dim")
        s["attention_factor"] = float(mscale(f, ms) / mscale(f, msa)) if ms and msa else mscale(f)
      else:
        s["attention_factor"] = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig))
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in s.items()))


def _rope(hf: Mapping[str, Any], mt: str):
  """(theta, scaling items, partial rotary factor, local theta) from either HF config format:
  flat `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (hub configs), and
  Gemma-3's per-layer-type `rope_parameters` or `rope_local_base_freq`."""
  get = hf.get
  params = dict(get("rope_parameters") or {})
  local_theta = None
  if mt == "gemma3_text":
    nested = "full_attention" in params or "sliding_attention" in params
    full = dict(params.get("full_attention") or {}) if nested else params
    local = dict(params.get("sliding_attention") or {}) if nested else {}
    _merge(full, get("rope_scaling"))
    if (local.get("rope_type") or "default") != "default":
      raise _refuse("rope_parameters.sliding_attention.rope_type", local["rope_type"],
                    "Gemma-3's sliding layers use unscaled RoPE here")
    local_theta = float(local.get("rope_theta", get("rope_local_base_freq", 10000.0)))
    params = full
    theta = float(params.get("rope_theta", get("rope_theta", 1_000_000.0)))
  else:
    _merge(params, get("rope_scaling"))
    theta = float(params.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0))))
  field = "rope_scaling" if get("rope_scaling") else "rope_parameters"
  pct = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
  return theta, _rope_items(params, hf, field), pct, local_theta


def _merge(params: dict[str, Any], scaling: Mapping[str, Any] | None) -> None:
  """Hub configs' `rope_scaling` over `rope_parameters`; its legacy `type` names the RoPE type."""
  if scaling:
    if "type" in scaling and "rope_type" not in scaling:
      params.pop("rope_type", None)
    params.update(scaling)


def _types(hf: Mapping[str, Any], default: list[str]) -> tuple[int, ...]:
  types = hf.get("layer_types") or default
  return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """Translate a HF `config.json` dict into a `ModelConfig`."""
  mt = hf.get("model_type")
  get = hf.get
  if mt == "gemma3":
    raise CheckpointError("model_type 'gemma3' is the multimodal Gemma-3; load its language model "
                          "(Gemma3ForCausalLM, model_type 'gemma3_text')")
  if mt not in SUPPORTED:
    raise CheckpointError(f"unknown model_type {mt!r} in config.json; supported: "
                          f"{', '.join(SUPPORTED)}")
  try:
    theta, scaling, pct, local_theta = _rope(hf, mt)
    common = dict(bos_token_id=get("bos_token_id"), eos_token_id=_first(get("eos_token_id")),
                  pad_token_id=get("pad_token_id"))
    if mt == "gpt2":
      d = hf["n_embd"]
      return ModelConfig(
          family="gpt2", d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
          d_head=d // hf["n_head"], d_mlp=get("n_inner") or 4 * d, d_vocab=hf["vocab_size"],
          n_ctx=hf["n_positions"], normalization="layernorm",
          norm_eps=get("layer_norm_epsilon", 1e-5),
          positional="learned", act_fn=_act(get("activation_function", "gelu_new")),
          tied_embeddings=True, **common)
    if mt == "gpt_neox":
      d, H = hf["hidden_size"], hf["num_attention_heads"]
      merged = {**(get("rope_parameters") or {}), **(get("rope_scaling") or {})}
      pct = merged.get("partial_rotary_factor", get("rotary_pct", 1.0))
      return ModelConfig(
          family="gpt_neox", d_model=d, n_layers=hf["num_hidden_layers"], n_heads=H, d_head=d // H,
          d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"],
          n_ctx=get("max_position_embeddings", 2048), normalization="layernorm",
          norm_eps=get("layer_norm_eps", 1e-5), positional="rotary", rotary_dim=int(d // H * pct),
          rope_theta=theta, rope_scaling=scaling,
          parallel_attn_mlp=get("use_parallel_residual", True),
          act_fn=_act(get("hidden_act", "gelu")),
          attn_bias=get("attention_bias", True), attn_out_bias=get("attention_bias", True),
          tied_embeddings=get("tie_word_embeddings", False), **common)
    return _llama_like(hf, mt, theta, scaling, pct, local_theta, common)
  except KeyError as e:
    raise CheckpointError(f"config.json for model_type {mt!r} lacks the key "
                          f"{e.args[0]!r}") from None


def _llama_like(hf, mt, theta, scaling, pct, local_theta, common) -> ModelConfig:
  """The decoders with Llama's layout: RMSNorm, rotary, gated MLP; each family's switches."""
  get = hf.get
  d, H, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
  dh = get("head_dim") or d // H
  family = _LLAMA_LIKE[mt]
  bias = bool(get("attention_bias", False))
  kw = dict(
      family=family, d_model=d, n_layers=L, n_heads=H, d_head=dh,
      n_kv_heads=get("num_key_value_heads") or H, d_mlp=hf["intermediate_size"],
      d_vocab=hf["vocab_size"], n_ctx=get("max_position_embeddings", 2048),
      normalization="rmsnorm", norm_eps=get("rms_norm_eps", 1e-6), positional="rotary",
      rotary_dim=int(dh * pct), rope_theta=theta, rope_scaling=scaling,
      gated_mlp=True, mlp_bias=bool(get("mlp_bias", False)),
      tied_embeddings=bool(get("tie_word_embeddings", mt in ("gemma2", "gemma3_text"))),
      act_fn=_act(get("hidden_act", "silu")), attn_bias=bias, attn_out_bias=bias, **common)
  if mt in ("qwen2", "qwen3"):
    window = get("sliding_window") if get("use_sliding_window") else None
    first = get("max_window_layers", L)
    kw.update(sliding_window=window, sliding_layers=_types(
        hf, ["sliding_attention" if i >= first else "full_attention" for i in range(L)])
        if window else ())
    if mt == "qwen2":
      kw.update(attn_bias=True, attn_out_bias=False)
    else:
      kw.update(qk_norm="head")
  elif mt in ("mistral", "phi3"):  # one window, every layer
    window = get("sliding_window")
    kw.update(sliding_window=window, sliding_layers=tuple(range(L)) if window else ())
  elif mt == "olmo2":
    kw.update(pre_norms=False, post_norms=True, qk_norm="all")
  elif mt in ("gemma2", "gemma3_text"):
    if get("use_bidirectional_attention"):
      raise _refuse("use_bidirectional_attention", True, "only causal attention is ported")
    if mt == "gemma2":
      default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    else:
      pattern = get("sliding_window_pattern") or 6
      default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    kw.update(act_fn=_act(get("hidden_activation") or get("hidden_act") or "gelu_pytorch_tanh"),
              rmsnorm_plus_one=True, post_norms=True, embed_scale=math.sqrt(d),
              attn_scale=get("query_pre_attn_scalar", dh) ** -0.5,
              attn_logit_softcap=get("attn_logit_softcapping"),
              final_logit_softcap=get("final_logit_softcapping"),
              sliding_window=get("sliding_window"), sliding_layers=_types(hf, default))
    if mt == "gemma3_text":
      kw.update(qk_norm="head", rope_local_theta=local_theta, layer_types_as_data=True)
  return ModelConfig(**kw)


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _act(name: str) -> str:
  return {"gelu_fast": "gelu_new", "gelu_new": "gelu_new", "gelu": "gelu", "silu": "silu",
          "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu"}.get(name, name)


# --------------------------------------------------------------------------------------------------
# Tensor mapping: HF name -> function of the tensor returning {param path: array}

Rule = Callable[[np.ndarray], dict[tuple[str, ...], np.ndarray]]


def _heads_in(H: int, dh: int) -> Callable[[np.ndarray], np.ndarray]:
  """torch Linear weight [H*dh, D] -> [H, D, dh]."""
  return lambda w: w.reshape(H, dh, -1).transpose(0, 2, 1)


def _heads_out(H: int, dh: int) -> Callable[[np.ndarray], np.ndarray]:
  """torch Linear weight [D, H*dh] -> [H, dh, D]."""
  return lambda w: w.T.reshape(H, dh, -1)


def _one(path: tuple[str, ...], fn: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> Rule:
  return lambda t: {path: fn(t)}


def _T(x):
  return x.T


def tensor_rules(cfg: ModelConfig) -> dict[str, Rule]:
  """Map every HF tensor name of the family to our parameter paths."""
  c = cfg
  H, dh, D = c.n_heads, c.d_head, c.d_model
  r: dict[str, Rule] = {}

  if c.family == "gpt2":
    r["wte.weight"] = _one(("W_E",))
    r["wpe.weight"] = _one(("W_pos",))
    r["ln_f.weight"], r["ln_f.bias"] = _one(("ln_final", "w")), _one(("ln_final", "b"))
    for layer in range(c.n_layers):
      b, h = f"blocks_{layer}", f"h.{layer}."

      def c_attn_w(w, b=b):
        q, k, v = np.split(w, 3, axis=1)  # Conv1D: [in, out]

        def f(m):
          return m.reshape(D, H, dh).transpose(1, 0, 2)

        return {(b, "attn", "W_Q"): f(q), (b, "attn", "W_K"): f(k), (b, "attn", "W_V"): f(v)}

      def c_attn_b(x, b=b):
        q, k, v = np.split(x, 3)
        return {(b, "attn", "b_Q"): q.reshape(H, dh), (b, "attn", "b_K"): k.reshape(H, dh),
                (b, "attn", "b_V"): v.reshape(H, dh)}

      r[h + "attn.c_attn.weight"], r[h + "attn.c_attn.bias"] = c_attn_w, c_attn_b
      r[h + "attn.c_proj.weight"] = _one((b, "attn", "W_O"), lambda w: w.reshape(H, dh, D))
      r[h + "attn.c_proj.bias"] = _one((b, "attn", "b_O"))
      for ln, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
        r[h + ln + ".weight"], r[h + ln + ".bias"] = _one((b, ours, "w")), _one((b, ours, "b"))
      r[h + "mlp.c_fc.weight"], r[h + "mlp.c_fc.bias"] = (_one((b, "mlp", "W_in")),
                                                          _one((b, "mlp", "b_in")))
      r[h + "mlp.c_proj.weight"] = _one((b, "mlp", "W_out"))
      r[h + "mlp.c_proj.bias"] = _one((b, "mlp", "b_out"))
    return r
  if c.family == "gpt_neox":
    r["embed_in.weight"] = _one(("W_E",))
    r["final_layer_norm.weight"] = _one(("ln_final", "w"))
    r["final_layer_norm.bias"] = _one(("ln_final", "b"))
    if not c.tied_embeddings:
      r["embed_out.weight"] = _one(("W_U",), _T)
    for layer in range(c.n_layers):
      b, h = f"blocks_{layer}", f"layers.{layer}."

      def qkv_w(w, b=b):
        w = w.reshape(H, 3, dh, D)
        return {(b, "attn", n): w[:, i].transpose(0, 2, 1)
                for i, n in enumerate(("W_Q", "W_K", "W_V"))}

      def qkv_b(x, b=b):
        x = x.reshape(H, 3, dh)
        return {(b, "attn", n): x[:, i] for i, n in enumerate(("b_Q", "b_K", "b_V"))}

      r[h + "attention.query_key_value.weight"] = qkv_w
      if c.attn_bias:
        r[h + "attention.query_key_value.bias"] = qkv_b
      r[h + "attention.dense.weight"] = _one((b, "attn", "W_O"), _heads_out(H, dh))
      if c.attn_out_bias:
        r[h + "attention.dense.bias"] = _one((b, "attn", "b_O"))
      for ln, ours in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
        r[h + ln + ".weight"], r[h + ln + ".bias"] = _one((b, ours, "w")), _one((b, ours, "b"))
      r[h + "mlp.dense_h_to_4h.weight"] = _one((b, "mlp", "W_in"), _T)
      r[h + "mlp.dense_h_to_4h.bias"] = _one((b, "mlp", "b_in"))
      r[h + "mlp.dense_4h_to_h.weight"] = _one((b, "mlp", "W_out"), _T)
      r[h + "mlp.dense_4h_to_h.bias"] = _one((b, "mlp", "b_out"))
    return r
  return r | _llama_rules(c)


def _llama_rules(c: ModelConfig) -> dict[str, Rule]:
  """The Llama layout's tensors, with each family's norms, qk-norms and fused projections."""
  H, K, dh = c.n_heads, c.kv_heads, c.d_head
  r: dict[str, Rule] = {}
  r["embed_tokens.weight"] = _one(("W_E",))
  r["norm.weight"] = _one(("ln_final", "w"))
  if not c.tied_embeddings:
    r["lm_head.weight"] = _one(("W_U",), _T)
  norms = {"input_layernorm": "ln1"} if c.pre_norms else {}
  if c.post_norms and c.pre_norms:  # Gemma
    norms.update(post_attention_layernorm="ln1_post", pre_feedforward_layernorm="ln2",
                 post_feedforward_layernorm="ln2_post")
  elif c.post_norms:  # OLMo-2: only the norms after attention and MLP
    norms.update(post_attention_layernorm="ln1_post", post_feedforward_layernorm="ln2_post")
  else:
    norms.update(post_attention_layernorm="ln2")
  for layer in range(c.n_layers):
    b, h = f"blocks_{layer}", f"layers.{layer}."
    a = h + "self_attn."
    if c.family == "phi3":  # fused [q; k; v] rows and [gate; up] rows
      def qkv(w, b=b):
        q, k, v = np.split(w, [H * dh, (H + K) * dh])
        return {(b, "attn", "W_Q"): _heads_in(H, dh)(q), (b, "attn", "W_K"): _heads_in(K, dh)(k),
                (b, "attn", "W_V"): _heads_in(K, dh)(v)}

      def gate_up(w, b=b):
        gate, up = np.split(w, 2)
        return {(b, "mlp", "W_gate"): gate.T, (b, "mlp", "W_in"): up.T}

      r[a + "qkv_proj.weight"], r[h + "mlp.gate_up_proj.weight"] = qkv, gate_up
    else:
      r[a + "q_proj.weight"] = _one((b, "attn", "W_Q"), _heads_in(H, dh))
      r[a + "k_proj.weight"] = _one((b, "attn", "W_K"), _heads_in(K, dh))
      r[a + "v_proj.weight"] = _one((b, "attn", "W_V"), _heads_in(K, dh))
      r[h + "mlp.gate_proj.weight"] = _one((b, "mlp", "W_gate"), _T)
      r[h + "mlp.up_proj.weight"] = _one((b, "mlp", "W_in"), _T)
    r[a + "o_proj.weight"] = _one((b, "attn", "W_O"), _heads_out(H, dh))
    if c.attn_bias:
      r[a + "q_proj.bias"] = _one((b, "attn", "b_Q"), lambda x: x.reshape(H, dh))
      r[a + "k_proj.bias"] = _one((b, "attn", "b_K"), lambda x: x.reshape(K, dh))
      r[a + "v_proj.bias"] = _one((b, "attn", "b_V"), lambda x: x.reshape(K, dh))
    if c.attn_out_bias:
      r[a + "o_proj.bias"] = _one((b, "attn", "b_O"))
    if c.qk_norm == "head":  # one [d_head] weight shared by the heads: stored per head
      r[a + "q_norm.weight"] = _one((b, "attn", "q_norm"), lambda w: np.tile(w, (H, 1)))
      r[a + "k_norm.weight"] = _one((b, "attn", "k_norm"), lambda w: np.tile(w, (K, 1)))
    elif c.qk_norm == "all":  # one [n_heads * d_head] weight
      r[a + "q_norm.weight"] = _one((b, "attn", "q_norm"), lambda w: w.reshape(H, dh))
      r[a + "k_norm.weight"] = _one((b, "attn", "k_norm"), lambda w: w.reshape(K, dh))
    for ln, ours in norms.items():
      r[h + ln + ".weight"] = _one((b, ours, "w"))
    r[h + "mlp.down_proj.weight"] = _one((b, "mlp", "W_out"), _T)
    if c.mlp_bias:
      r[h + "mlp.up_proj.bias"] = _one((b, "mlp", "b_in"))
      r[h + "mlp.down_proj.bias"] = _one((b, "mlp", "b_out"))
      r[h + "mlp.gate_proj.bias"] = _bias_unsupported
  return r


def _bias_unsupported(x):
  raise CheckpointError("gate_proj.bias is not supported (mlp_bias on a gated MLP)")
