"""EAP-IG-inputs on TransformerLens hooks: the reference algorithm, as the benchmarks' TL baseline.

This runs the algorithm of the `eap` package (github.com/hannamw/EAP-IG, `eap/attribute.py`,
`get_scores_eap_ig`, i.e. `attribute(..., method="EAP-IG-inputs")`) the way that package runs it:
on a TransformerLens `HookedTransformer` with `use_split_qkv_input`, `use_attn_result` and
`use_hook_mlp_in` switched on, with forward and backward hooks doing all the work. It is written
from scratch (no code of the `eap` package is copied); only its semantics are followed:

1. A hooked forward on the corrupted tokens adds every sender's output (the input embedding at
   `blocks.0.hook_resid_pre` = hook_embed + hook_pos_embed, each head's `attn.hook_result`, each
   `hook_mlp_out`) into `activation_difference` [batch, pos, n_senders, d_model]; a hooked forward
   on the clean tokens subtracts them (both without gradients).
2. For each of the m steps k = 0..m-1, a forward on the clean tokens whose input node is replaced by
   the interpolation corrupt + (k/m)(clean - corrupt) of the input embeddings, then `backward()` of
   the metric. Backward hooks at every receiver input (`hook_q_input`/`hook_k_input`/`hook_v_input`,
   [batch, pos, head, d_model] each; `hook_mlp_in`; `blocks.{L-1}.hook_resid_post` for the logits)
   contract the gradient with the activation differences of the senders upstream of that receiver
   and add the result into `scores` [n_senders, n_receivers], once per step.
3. scores / m.

The metric is the logit difference logit[correct] - logit[incorrect] at each example's last real
token, from the full [batch, pos, vocab] logits the model computes, summed over the batch and
divided by the total number of examples, so the scores are in the metric's units (a mean) and
equal those of `benchmarks/torch_baseline.py`'s `torch_eap_ig_inputs` (same arguments, same index
layout: senders 0 = input, head (l, h) at 1 + l(H+1) + h, MLP l at 1 + l(H+1) + H; receivers q/k/v
of head (l, h) at l(3H+1) + {0, H, 2H} + h, MLP l at l(3H+1) + 3H, logits last).

The model is built from a Hugging Face `GPT2LMHeadModel` without the hub: a
`HookedTransformerConfig` written from its `GPT2Config`, TL's own GPT-2 weight converter, and
`load_and_process_state_dict` with every folding/centering option off, so the numerics are the HF
model's (`hooked_from_hf` builds Llama, GPT-NeoX and Gemma-2 models alike, for the reference
tests). Right-padded batches pass the attention mask to the model (as the `eap` package does);
each batch is trimmed to its longest example.

Needs a TransformerLens that still has `HookedTransformer` and installs beside torch 2.13 and
transformers 5.x: `pip install "transformer-lens==3.9.0"` (4.x removed `HookedTransformer`).
"""

from __future__ import annotations

import warnings

import torch

from benchmarks.torch_baseline import BaselineInputError, check_inputs

Tensor = torch.Tensor


class TLBaselineError(ValueError):
  """Bad input to the TransformerLens baseline."""


def _rope(c, key: str, legacy: str, default: float) -> float:
  """A RoPE setting: from `rope_parameters` (transformers 5), else the config's legacy field."""
  params = getattr(c, "rope_parameters", None) or {}
  return float(params.get(key, getattr(c, legacy, default)))


def _tl_config(c, dtype, device):
  """TransformerLens's config for an HF GPT-2, Llama, GPT-NeoX or Gemma-2 config (TL's own
  `convert_hf_model_config` branches, without its hub lookup), hooks for EAP on."""
  from transformer_lens import HookedTransformerConfig

  common = dict(device=device, dtype=dtype, init_weights=False,  # every weight is overwritten
                use_split_qkv_input=True, use_attn_result=True, use_hook_mlp_in=True)
  if c.model_type == "gpt2":
    if getattr(c, "reorder_and_upcast_attn", False):
      raise TLBaselineError("reorder_and_upcast_attn is not supported")
    d, H = c.n_embd, c.n_head
    return HookedTransformerConfig(
        d_model=d, n_layers=c.n_layer, n_heads=H, d_head=d // H, d_mlp=c.n_inner or 4 * d,
        d_vocab=c.vocab_size, d_vocab_out=c.vocab_size, n_ctx=c.n_positions,
        act_fn={"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}[c.activation_function],
        eps=c.layer_norm_epsilon, normalization_type="LN", positional_embedding_type="standard",
        use_attn_scale=bool(c.scale_attn_weights),
        scale_attn_by_inverse_layer_idx=bool(c.scale_attn_by_inverse_layer_idx),
        original_architecture="GPT2LMHeadModel", model_name="gpt2-from-hf", **common)
  d, H = c.hidden_size, c.num_attention_heads
  shared = dict(d_model=d, n_layers=c.num_hidden_layers, n_heads=H, d_head=d // H,
                d_mlp=c.intermediate_size, d_vocab=c.vocab_size, d_vocab_out=c.vocab_size,
                n_ctx=c.max_position_embeddings,
                act_fn=getattr(c, "hidden_act", None) or c.hidden_activation,
                positional_embedding_type="rotary", rotary_adjacent_pairs=False,
                rotary_base=_rope(c, "rope_theta", "rope_theta", 10000.0), **common)
  if c.model_type == "llama":
    kv = c.num_key_value_heads
    return HookedTransformerConfig(
        eps=c.rms_norm_eps, normalization_type="RMS", rotary_dim=d // H, final_rms=True,
        gated_mlp=True, n_key_value_heads=kv if kv != H else None,
        ungroup_grouped_query_attention=True,  # EAP-IG's graph: one q/k/v input per query head
        original_architecture="LlamaForCausalLM", model_name="llama-from-hf", **shared)
  if c.model_type == "gpt_neox":
    pct = _rope(c, "partial_rotary_factor", "rotary_pct", 1.0)
    return HookedTransformerConfig(
        eps=c.layer_norm_eps, normalization_type="LN", rotary_dim=round(pct * (d // H)),
        use_attn_scale=True, parallel_attn_mlp=bool(c.use_parallel_residual),
        original_architecture="GPTNeoXForCausalLM", model_name="neox-from-hf", **shared)
  if c.model_type == "gemma2":
    kv = c.num_key_value_heads
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    return HookedTransformerConfig(
        **{**shared, "d_head": c.head_dim}, eps=c.rms_norm_eps, normalization_type="RMS",
        rotary_dim=c.head_dim, use_attn_scale=True,
        attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        n_key_value_heads=kv if kv != H else None, ungroup_grouped_query_attention=True,
        window_size=c.sliding_window, use_local_attn=True,
        attn_types=[kinds[t] for t in c.layer_types],
        attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=c.final_logit_softcapping or -1.0, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
        model_name="gemma2-from-hf")
  raise TLBaselineError(f"hooked_from_hf needs a GPT-2, Llama, GPT-NeoX or Gemma-2 model, got "
                        f"{c.model_type!r}")


def hooked_from_hf(hf_model, device=None):
  """A `HookedTransformer` with the weights of a `transformers` GPT-2, Llama (GQA ungrouped per
  query head), GPT-NeoX or Gemma-2 model, hooks for EAP on.

  No LayerNorm folding, weight centering or value-bias folding: logits equal the HF model's. The
  TL parameters do not require gradients (only the receiver-input gradients are needed).
  """
  from transformer_lens import HookedTransformer
  from transformer_lens.pretrained import weight_conversions

  p = next(hf_model.parameters())
  cfg = _tl_config(hf_model.config, p.dtype, str(device or p.device))
  convert = {"gpt2": weight_conversions.convert_gpt2_weights,
             "llama": weight_conversions.convert_llama_weights,
             "gpt_neox": weight_conversions.convert_neox_weights,
             "gemma2": weight_conversions.convert_gemma_weights}[hf_model.config.model_type]
  with warnings.catch_warnings():  # TL 3.x points to TransformerBridge; we want the hooked class
    warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
    model = HookedTransformer(cfg)
  with torch.no_grad():
    state = convert(hf_model, cfg)
  model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                    center_unembed=False, fold_value_biases=False)
  model.eval()
  model.requires_grad_(False)
  return model


def _check(model, clean, corrupted, mask, last, correct, incorrect, steps, batch_size):
  try:  # the same input contract as the torch baseline
    check_inputs(clean, corrupted, mask, last, correct, incorrect, model.cfg.n_ctx, steps,
                 batch_size)
  except BaselineInputError as e:
    raise TLBaselineError(str(e)) from None
  for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in"):
    if not getattr(model.cfg, flag):
      raise TLBaselineError(f"the HookedTransformer needs cfg.{flag}=True")


def tl_eap_ig_inputs(model, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                     correct: Tensor, incorrect: Tensor, steps: int = 5,
                     batch_size: int = 16) -> Tensor:
  """EAP-IG-inputs edge scores with TransformerLens hooks, the `eap` package's way.

  Args:
    model: a `HookedTransformer` from `hooked_from_hf` (or one configured alike), or a
      `transformers.GPT2LMHeadModel`, converted with `hooked_from_hf` first.
    clean, corrupted: Long[Tensor, "batch pos"] token ids, BOS first, right padded, equal lengths.
    mask: Int[Tensor, "batch pos"] 1 on real tokens (passed to the model as its attention mask).
    last: Long[Tensor, "batch"] index of each example's last real token (where the metric is read).
    correct, incorrect: Long[Tensor, "batch"] answer token ids; the metric is their logit
      difference.
    steps: number of interpolation steps m; alpha_k = k/m for k = 0..m-1.
    batch_size: examples per forward/backward.

  Returns:
    Float[Tensor, "sender receiver"] scores in the metric's units (mean over examples), zero on
    invalid edges, on the model's device; the layout of `torch_eap_ig_inputs`.
  """
  from transformer_lens import HookedTransformer
  if not isinstance(model, HookedTransformer):
    if getattr(model, "training", False):
      raise TLBaselineError("put the model in eval mode (hf_model.eval()): dropout is active")
    model = hooked_from_hf(model)
  _check(model, clean, corrupted, mask, last, correct, incorrect, steps, batch_size)
  cfg = model.cfg
  dev = cfg.device
  L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
  S, R = 1 + L * (H + 1), L * (3 * H + 1) + 1
  n = clean.shape[0]
  scores = torch.zeros(S, R, device=dev, dtype=cfg.dtype)
  clean, corrupted, mask, last, correct, incorrect = (
      t.to(dev) for t in (clean, corrupted, mask, last, correct, incorrect))

  for i in range(0, n, batch_size):
    sl = slice(i, i + batch_size)
    b_last, b_correct, b_incorrect = last[sl], correct[sl], incorrect[sl]
    p = int(b_last.max()) + 1  # the batch's longest example (tokenised per batch, as `eap` does)
    b_clean, b_corr, b_mask = clean[sl, :p], corrupted[sl, :p], mask[sl, :p]
    b = b_clean.shape[0]
    diff = torch.zeros(b, p, S, d, device=dev, dtype=cfg.dtype)  # corrupted - clean outputs
    rows = torch.arange(b, device=dev)

    def store(index, sign, diff=diff):
      def hook(act, hook):
        a = act.detach()
        if sign > 0:
          diff[:, :, index] += a
        else:
          diff[:, :, index] -= a
      return hook

    def fwd_hooks(sign):
      hooks = [("blocks.0.hook_resid_pre", store(0, sign))]
      for layer in range(L):
        base = 1 + layer * (H + 1)
        hooks.append((f"blocks.{layer}.attn.hook_result", store(slice(base, base + H), sign)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", store(base + H, sign)))
      return hooks

    def accumulate(n_up, cols, diff=diff):
      """Backward hook: scores[senders before the receiver, receiver cols] += diff . grad."""
      def hook(grad, hook):
        g = grad.detach()
        if g.ndim == 3:  # [b, p, d]: one receiver
          scores[:n_up, cols] += torch.einsum("bpsd,bpd->s", diff[:, :, :n_up], g)
        else:  # [b, p, H, d]: one receiver per head
          scores[:n_up, cols] += torch.einsum("bpsd,bphd->sh", diff[:, :, :n_up], g)
      return hook

    bwd_hooks = []
    for layer in range(L):
      up_attn = 1 + layer * (H + 1)
      r0 = layer * (3 * H + 1)
      for j, letter in enumerate("qkv"):
        bwd_hooks.append((f"blocks.{layer}.hook_{letter}_input",
                          accumulate(up_attn, slice(r0 + j * H, r0 + (j + 1) * H))))
      bwd_hooks.append((f"blocks.{layer}.hook_mlp_in", accumulate(up_attn + H, r0 + 3 * H)))
    bwd_hooks.append((f"blocks.{L - 1}.hook_resid_post", accumulate(S, R - 1)))

    with torch.no_grad():
      with model.hooks(fwd_hooks=fwd_hooks(+1)):
        model(b_corr, attention_mask=b_mask)
      x_corr = diff[:, :, 0].clone()
      with model.hooks(fwd_hooks=fwd_hooks(-1)):
        model(b_clean, attention_mask=b_mask)
      x_clean = x_corr - diff[:, :, 0]

    for k in range(steps):
      def interpolate(act, hook, alpha=k / steps, x_corr=x_corr, x_clean=x_clean):
        x = (x_corr + alpha * (x_clean - x_corr)).detach()
        return x.requires_grad_(True)

      with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", interpolate)],
                       bwd_hooks=bwd_hooks):
        logits = model(b_clean, attention_mask=b_mask)  # [b, p, vocab]
        lg = logits[rows, b_last]
        metric = (lg[rows, b_correct] - lg[rows, b_incorrect]).sum() / n
        metric.backward()
  return scores / steps
