"""One configuration for every decoder family.

GPT-2, GPT-NeoX/Pythia, Llama-3, Qwen2.5, Gemma-2, Gemma-3, Qwen3, Mistral, OLMo-2 and Phi-3 are the
same decoder with different switches (docs/models.md lists each family's); so are tracr-compiled
models (`models.tracr`: no normalisation, non-causal attention if compiled so, ReLU MLPs, an
unembedding onto the output SOp's vocabulary).
`ModelConfig` is frozen and hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
  """A model configuration that jaxinterp cannot build."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  Attributes mirror TransformerLens's `HookedTransformerConfig` where one exists.
  """

  family: str  # one of FAMILIES (below): where the weights came from, not a code path
  d_model: int
  n_layers: int
  n_heads: int
  d_head: int
  d_mlp: int
  d_vocab: int
  n_ctx: int = 2048
  n_kv_heads: int | None = None  # GQA; None means n_heads
  # Normalisation.
  normalization: str = "layernorm"  # "layernorm" | "rmsnorm" | "none" (identity, no params)
  norm_eps: float = 1e-5
  rmsnorm_plus_one: bool = False  # Gemma scales by (1 + w)
  post_norms: bool = False  # Gemma-2/3, OLMo-2: norm on the attention and MLP outputs
  pre_norms: bool = True  # False (OLMo-2): no norm on the attention and MLP inputs (identity)
  qk_norm: str = "none"  # "head": RMSNorm of each head's q and k over d_head (Qwen3, Gemma-3);
  # "all": over all heads' q (and all k) at once (OLMo-2). Applied before rotary.
  # Positions.
  positional: str = "learned"  # "learned" | "rotary"
  rotary_dim: int = 0
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # models.rope.ROPE_TYPES, sorted items
  rope_local_theta: float | None = None  # Gemma-3: sliding layers' RoPE base (unscaled RoPE)
  # Blocks.
  parallel_attn_mlp: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
  act_fn: str = "gelu_new"  # gelu_new | gelu | silu | gelu_pytorch_tanh | relu
  gated_mlp: bool = False
  attn_bias: bool = True  # bias on q, k, v
  attn_out_bias: bool = True  # bias on the attention output projection
  mlp_bias: bool = True
  # Embedding / unembedding.
  tied_embeddings: bool = True
  d_vocab_out: int | None = None  # unembedding width if not d_vocab (untied only; tracr)
  embed_scale: float = 1.0  # Gemma: sqrt(d_model)
  unembed_bias: bool = False
  # Attention extras.
  attn_scale: float | None = None  # multiplier on q.k; default 1/sqrt(d_head)
  causal: bool = True  # False: every query sees every (unpadded) key, as tracr's default
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()  # layers that use the sliding window
  # Whether the scan over blocks carries each layer's type (window, RoPE base) as data, so that
  # alternating layers still run as one scan (Gemma-3). False keeps Gemma-2's unscanned blocks.
  layer_types_as_data: bool = False
  # Tokens.
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"unknown model family {self.family!r}; supported: {sorted(FAMILIES)}")
    if self.normalization not in ("layernorm", "rmsnorm", "none"):
      raise ConfigError(f"unknown normalization {self.normalization!r}")
    if self.positional not in ("learned", "rotary"):
      raise ConfigError(f"unknown positional embedding {self.positional!r}")
    if self.act_fn not in ACTIVATIONS:
      raise ConfigError(f"unknown activation {self.act_fn!r}; supported: {sorted(ACTIVATIONS)}")
    if self.d_vocab_out is not None and self.tied_embeddings:
      raise ConfigError(f"d_vocab_out={self.d_vocab_out} needs untied embeddings "
                        f"(tied_embeddings=False)")
    if self.n_heads % self.kv_heads:
      raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.qk_norm not in ("none", "head", "all"):
      raise ConfigError(f"unknown qk_norm {self.qk_norm!r}; supported: none, head, all")
    if self.qk_norm != "none" and self.normalization != "rmsnorm":
      raise ConfigError(f"qk_norm={self.qk_norm!r} needs normalization='rmsnorm'")
    if self.positional == "rotary" and (self.rotary_dim <= 0 or self.rotary_dim > self.d_head
                                        or self.rotary_dim % 2):
      raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and in (0, "
                        f"d_head={self.d_head}]")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def vocab_out(self) -> int:
    """Width of the logits: `d_vocab_out` if set, else `d_vocab`."""
    return self.d_vocab if self.d_vocab_out is None else self.d_vocab_out

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in self.rope_scaling_dict.items()} or None
    d["sliding_layers"] = list(self.sliding_layers)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ConfigError(f"unknown config keys: {sorted(unknown)}")
    if d.get("rope_scaling"):
      d["rope_scaling"] = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                       for k, v in d["rope_scaling"].items()))
    if "sliding_layers" in d:
      d["sliding_layers"] = tuple(d["sliding_layers"])
    return cls(**d)


FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "gemma3", "qwen3", "mistral", "olmo2",
            "phi3", "tracr")
ACTIVATIONS = ("gelu_new", "gelu", "silu", "gelu_pytorch_tanh", "relu")
