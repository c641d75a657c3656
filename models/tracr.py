"""Porting tracr-compiled transformers into the one decoder.

tracr (google-deepmind/tracr, on PyPI as `tracr-pypi`; `pip install "jaxinterp[tracr]"`) compiles a
RASP program into the weights of a transformer whose residual stream is a direct sum of one
subspace per SOp (basis directions named like `tokens:a`, `indices:3`, `one`, `frac_prevs`).
`from_tracr(assembled)` takes what `tracr.compiler.compiling.compile_rasp_to_model` returns and
gives a `models.Model` whose forward equals tracr's own. A tracr model is the usual decoder with
these switches of `ModelConfig` (family "tracr"):

- `normalization="none"`: tracr compiles without layer norm (the identity, no params);
- `causal`: as compiled (`causal=False` is tracr's default: every query sees every key);
- `n_heads`, `d_head`, `d_mlp`: tracr's own padded sizes (a layer with fewer heads has empty,
  all-zero ones; so does a layer with no attention or no MLP);
- `act_fn="relu"`, biases ported as they are (tracr's are zero; its MLPs read the `one` direction);
- `attn_scale = 1/sqrt(key_size)`, as tracr's attention; its softmax coldness (100 by default) is
  in the query weights, and the BOS token (always position 0) is a key like any other;
- untied embeddings: `W_E` is tracr's token embedding (which also writes `one`), `W_pos` its
  position embedding (row 0, BOS, is zero; row i writes `indices:i-1`), and `W_U [d_model,
  d_vocab_out]` projects the residual stream onto the output SOp's subspace, so the logits are
  tracr's output-space values (one per output value; one logit for a numerical output).

A tracr layer is one block (its attention, then its MLP), so the graph has the usual `a{l}.h{h}`
and `m{l}` nodes. The residual basis is kept as it is, in tracr's order (`TracrEncoding`).

tracr and haiku are imported only inside `from_tracr` (to read tracr's unembedding); nothing else in
the package needs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .pretrained import Model


class TracrError(ValueError):
  """A tracr model this port does not support, or a value outside a compiled model's encoding."""


@dataclasses.dataclass(frozen=True)
class TracrEncoding:
  """How a tracr model's values map to token ids, and its logits back to values.

  Attributes:
    input_values: the input vocabulary; position = token id (BOS and pad included).
    bos, pad: tracr's BOS and pad values (`compiler_bos`, `compiler_pad`).
    output_values: the output SOp's values, position = logit index; None for a numerical output
      (one logit, the value itself).
    residual_labels: name of each residual direction (`d_model` of them), e.g. `tokens:a`.
    output_labels: the residual direction each logit reads.
    max_seq_len: the longest input, BOS not counted.
  """

  input_values: tuple
  bos: Any
  pad: Any
  output_values: tuple | None
  residual_labels: tuple[str, ...]
  output_labels: tuple[str, ...]
  max_seq_len: int

  @property
  def categorical(self) -> bool:
    """Whether the output SOp is categorical (one logit per value) rather than numerical."""
    return self.output_values is not None

  @property
  def bos_id(self) -> int:
    """The token id of BOS."""
    return self.input_values.index(self.bos)

  @property
  def pad_id(self) -> int:
    """The token id of tracr's pad token (mask it out with `attention_mask`)."""
    return self.input_values.index(self.pad)

  @property
  def vocab_ids(self) -> dict:
    """{value: token id} of the program's own vocabulary (BOS and pad left out)."""
    return {v: i for i, v in enumerate(self.input_values) if v not in (self.bos, self.pad)}

  def encode(self, values: Sequence) -> list[int]:
    """Token ids of one input; BOS is prepended unless `values` starts with it.

    Raises TracrError naming a value outside the encoding, or an input longer than `max_seq_len`.
    """
    values = list(values)
    if not values or values[0] != self.bos:
      values = [self.bos] + values
    ids = self.vocab_ids
    bad = [v for v in values[1:] if v not in ids]
    if bad:
      raise TracrError(f"value {bad[0]!r} is not in the compiled program's input encoding "
                       f"{sorted(ids, key=repr)}")
    if len(values) - 1 > self.max_seq_len:
      raise TracrError(f"input of {len(values) - 1} values is longer than max_seq_len="
                       f"{self.max_seq_len}")
    return [self.bos_id] + [ids[v] for v in values[1:]]

  def decode(self, logits) -> list:
    """Values from logits `[pos, d_vocab_out]`: the argmax's value (categorical) or the number."""
    logits = np.asarray(logits)
    if self.categorical:
      return [self.output_values[i] for i in np.argmax(logits, -1)]
    return [float(x) for x in logits[..., 0]]


@dataclasses.dataclass
class TracrModel(Model):
  """A `models.Model` ported from tracr, with its `TracrEncoding` (`m.encoding.encode(...)`)."""

  encoding: TracrEncoding | None = None

  def apply(self, values: Sequence) -> list:
    """Decoded outputs for one input (as tracr's `assembled.apply(...).decoded`, BOS first)."""
    ids = np.asarray([self.encoding.encode(values)], np.int32)
    out = self.encoding.decode(np.asarray(self(ids))[0])
    return [self.encoding.bos] + out[1:]


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def unembedding(assembled) -> np.ndarray:
  """tracr's unembedding as a matrix `[d_model, n_out]`: the projection of the residual stream onto
  the output SOp's subspace (read from tracr's own unembed module, applied to the identity)."""
  import haiku as hk  # tracr's dependency: only needed for a tracr model

  d = len(assembled.residual_labels)

  def f(x):
    return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

  out = hk.without_apply_rng(hk.transform(f)).apply({}, jnp.eye(d, dtype=jnp.float32))
  return _np(out).reshape(d, -1)


def tracr_encoding(assembled) -> TracrEncoding:
  """The `TracrEncoding` of a compiled model (its input and output encoders, residual labels)."""
  enc = assembled.input_encoder
  if enc is None or not hasattr(enc, "encoding_map"):
    raise TracrError("the tracr model has no categorical input encoder")
  inputs = [None] * len(enc.encoding_map)
  for value, i in enc.encoding_map.items():
    inputs[i] = value
  labels = tuple(assembled.residual_labels)
  W_U = unembedding(assembled)
  out_labels = tuple(labels[int(np.argmax(np.abs(W_U[:, j])))] for j in range(W_U.shape[1]))
  out_enc = assembled.output_encoder
  outputs = None
  if out_enc is not None and hasattr(out_enc, "encoding_map"):
    outputs = [None] * len(out_enc.encoding_map)
    for value, i in out_enc.encoding_map.items():
      outputs[i] = value
    outputs = tuple(outputs)
  n_pos = np.asarray(assembled.params["pos_embed"]["embeddings"]).shape[0]
  return TracrEncoding(tuple(inputs), enc.bos_token, enc.pad_token, outputs, labels, out_labels,
                       n_pos - 1)


def from_tracr(assembled) -> TracrModel:
  """A `TracrModel` (a `models.Model`) computing what a tracr-compiled model computes.

  Args:
    assembled: a `tracr.compiler.assemble.AssembledTransformerModel`, as
      `compile_rasp_to_model(program, vocab, max_seq_len, compiler_bos=...)` returns it.

  Returns:
    The model: `m(ids)` gives logits `[batch, pos, d_vocab_out]`, tracr's output-space values
    (`assembled.forward(...).transformer_output.output @ unembedding(assembled)`, equal within
    float32 rounding); `m.apply(values)` the decoded outputs; `m.encoding` the token and output
    maps. Token ids are tracr's (`m.encoding.encode(values)`), BOS first; pad with `encoding.pad_id`
    and mask it out with `attention_mask`, as tracr masks its pad token.
  """
  mc = assembled.model_config
  if getattr(mc, "layer_norm", False):
    raise TracrError("tracr model compiled with layer_norm=True; tracr's compiler never does this")
  act = getattr(mc.activation_function, "__name__", "")
  if act != "relu":
    raise TracrError(f"tracr model with activation {act!r}; only ReLU MLPs are supported")
  p = assembled.params
  W_E = _np(p["token_embed"]["embeddings"])
  W_pos = _np(p["pos_embed"]["embeddings"])
  W_U = unembedding(assembled)
  V, D = W_E.shape
  H, dh, L = int(mc.num_heads), int(mc.key_size), int(mc.num_layers)
  encoding = tracr_encoding(assembled)
  cfg = ModelConfig(
      family="tracr", d_model=D, n_layers=L, n_heads=H, d_head=dh, d_mlp=int(mc.mlp_hidden_size),
      d_vocab=V, d_vocab_out=W_U.shape[1], n_ctx=W_pos.shape[0], normalization="none",
      act_fn="relu", tied_embeddings=False, attn_scale=1.0 / math.sqrt(dh),
      causal=bool(mc.causal), bos_token_id=encoding.bos_id, pad_token_id=encoding.pad_id)
  params: dict[str, Any] = {"W_E": W_E, "W_pos": W_pos, "W_U": W_U}
  for layer in range(L):
    t = f"transformer/layer_{layer}/"
    attn = {}
    for c, name in (("Q", "query"), ("K", "key"), ("V", "value")):
      attn[f"W_{c}"] = _np(p[t + f"attn/{name}"]["w"]).reshape(D, H, dh).transpose(1, 0, 2)
      attn[f"b_{c}"] = _np(p[t + f"attn/{name}"]["b"]).reshape(H, dh)
    attn["W_O"] = _np(p[t + "attn/linear"]["w"]).reshape(H, dh, D)
    attn["b_O"] = _np(p[t + "attn/linear"]["b"])
    mlp = {"W_in": _np(p[t + "mlp/linear_1"]["w"]), "b_in": _np(p[t + "mlp/linear_1"]["b"]),
           "W_out": _np(p[t + "mlp/linear_2"]["w"]), "b_out": _np(p[t + "mlp/linear_2"]["b"])}
    params[f"blocks_{layer}"] = {"attn": attn, "mlp": mlp}
  params = {k: ({kk: {n: jnp.asarray(a) for n, a in vv.items()} for kk, vv in v.items()}
                if isinstance(v, dict) else jnp.asarray(v)) for k, v in params.items()}
  return TracrModel(cfg, params, None, None, encoding)
