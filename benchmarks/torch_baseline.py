"""Eager-PyTorch EAP-IG-inputs for a Hugging Face GPT-2: the baseline the benchmarks time JAX
against.

It computes the same scores as the `eap` package's `EAP-IG-inputs` (and as `tests/torch_oracle.py`),
in the metric's units: for the mean logit difference m at each example's last real token,

    score[s, r] = mean_i sum_pos (a_s^corrupt - a_s^clean) . (1/m) sum_k dm/dx_r at x(k/m)

where x(alpha) = corrupt + alpha (clean - corrupt) interpolates the input embeddings and x_r is the
input of receiver r (each head's q, k and v input separately, each MLP input, the logits input).

Written for speed in eager torch: no hooks and no per-edge loops. Each layer's q/k/v inputs are the
residual stream expanded to one copy per (q|k|v, head) (TransformerLens' `use_split_qkv_input`), the
gradients of all receivers come from one `torch.autograd.grad` per step, are summed over steps, and
are contracted with the sender differences in one einsum per layer per batch.

Index layout as `models/edges.py`: senders 0 = input, head (l, h) at 1 + l(H+1) + h, MLP l at
1 + l(H+1) + H; receivers q/k/v of head (l, h) at l(3H+1) + {0, H, 2H} + h, MLP l at l(3H+1) + 3H,
logits last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class BaselineInputError(ValueError):
  """Bad input to the torch baseline."""


def _weights(hf_model) -> dict:
  """Per-head views of a GPT2LMHeadModel's weights (no copies)."""
  cfg = hf_model.config
  if getattr(cfg, "model_type", None) != "gpt2":
    raise BaselineInputError(f"torch_eap_ig_inputs needs a GPT-2 model, got {cfg.model_type!r}")
  t = hf_model.transformer
  d, H = cfg.n_embd, cfg.n_head
  dh = d // H
  layers = []
  for layer, blk in enumerate(t.h):
    w, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # [d, 3d], [3d]
    scale = dh ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= float(layer + 1)
    layers.append(dict(
        ln1=blk.ln_1, ln2=blk.ln_2,
        W_qkv=w.view(d, 3, H, dh).permute(1, 2, 0, 3),  # [3, H, d, dh]
        b_qkv=b.view(3, H, dh),
        W_attn=w, b_attn=b,
        W_O=blk.attn.c_proj.weight.view(H, dh, d), b_O=blk.attn.c_proj.bias,
        mlp=blk.mlp, scale=scale))
  return dict(wte=t.wte.weight, wpe=t.wpe.weight, ln_f=t.ln_f, lm_head=hf_model.lm_head,
              layers=layers, n_layers=len(layers), n_heads=H, d_model=d, d_head=dh)


def _ln(x: Tensor, mod) -> Tensor:
  return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _senders(W: dict, x0: Tensor, allowed: Tensor) -> Tensor:
  """Plain forward collecting sender outputs: Float[Tensor, "batch pos sender d_model"]."""
  b, p, d = x0.shape
  H, dh, L = W["n_heads"], W["d_head"], W["n_layers"]
  out = x0.new_empty(b, p, 1 + L * (H + 1), d)
  out[:, :, 0] = x0
  resid = x0
  for layer, lw in enumerate(W["layers"]):
    qkv = (_ln(resid, lw["ln1"]) @ lw["W_attn"] + lw["b_attn"]).view(b, p, 3, H, dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [b, H, p, dh]
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=lw["scale"])
    result = torch.einsum("bhpe,hed->bphd", z, lw["W_O"])  # [b, p, H, d]
    base = 1 + layer * (H + 1)
    out[:, :, base:base + H] = result
    resid = resid + result.sum(2) + lw["b_O"]
    mlp = lw["mlp"](_ln(resid, lw["ln2"]))
    out[:, :, base + H] = mlp
    resid = resid + mlp
  return out


def _metric_sum(W: dict, final: Tensor, last: Tensor, correct: Tensor, incorrect: Tensor,
                full_logits: bool) -> Tensor:
  """Sum over the batch of logit[correct] - logit[incorrect] at each example's last real token."""
  rows = torch.arange(final.shape[0], device=final.device)
  if full_logits:
    logits = W["lm_head"](_ln(final, W["ln_f"]))  # [b, p, vocab], as the `eap` package computes
    lg = logits[rows, last]
    return (lg[rows, correct] - lg[rows, incorrect]).sum()
  y = _ln(final[rows, last], W["ln_f"])  # [b, d]
  head = W["lm_head"]
  u = head.weight[correct] - head.weight[incorrect]  # [b, d]
  d = (y * u).sum(-1)
  if head.bias is not None:
    d = d + head.bias[correct] - head.bias[incorrect]
  return d.sum()


def _receiver_grads(W: dict, x0: Tensor, allowed: Tensor, last, correct, incorrect, n_total: int,
                    full_logits: bool) -> list:
  """Gradients of the mean metric w.r.t. every receiver input, grouped per layer.

  Returns [g_qkv_0 [b,p,3H,d], g_mlp_0 [b,p,d], ..., g_logits [b,p,d]].
  """
  b, p, d = x0.shape
  H = W["n_heads"]
  resid = x0
  recv = []
  for lw in W["layers"]:
    x_qkv = resid.unsqueeze(2).expand(b, p, 3 * H, d)  # one receiver input per (q|k|v, head)
    ln = _ln(x_qkv, lw["ln1"]).view(b, p, 3, H, d)
    qkv = torch.einsum("bpchd,chde->cbhpe", ln, lw["W_qkv"]) + lw["b_qkv"][:, None, :, None, :]
    z = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed,
                                       scale=lw["scale"])
    resid = resid + torch.einsum("bhpe,hed->bpd", z, lw["W_O"]) + lw["b_O"]
    x_mlp = resid.view_as(resid)  # a distinct node: its gradient is the MLP input's alone
    resid = resid + lw["mlp"](_ln(x_mlp, lw["ln2"]))
    recv += [x_qkv, x_mlp]
  x_logits = resid.view_as(resid)
  recv.append(x_logits)
  m = _metric_sum(W, x_logits, last, correct, incorrect, full_logits) / n_total
  return list(torch.autograd.grad(m, recv))


def check_inputs(clean, corrupted, mask, last, correct, incorrect, n_ctx: int, steps: int,
                 batch_size: int) -> None:
  """Raise `BaselineInputError` unless the baseline's tensors have consistent shapes and sizes."""
  if clean.ndim != 2 or clean.shape != corrupted.shape or clean.shape != mask.shape:
    raise BaselineInputError(
        f"clean {tuple(clean.shape)}, corrupted {tuple(corrupted.shape)} and mask "
        f"{tuple(mask.shape)} must be equal [batch, pos] shapes (equal token lengths)")
  n = clean.shape[0]
  for name, t in (("last", last), ("correct", correct), ("incorrect", incorrect)):
    if tuple(t.shape) != (n,):
      raise BaselineInputError(f"{name} has shape {tuple(t.shape)}, expected ({n},)")
  if clean.shape[1] > n_ctx:
    raise BaselineInputError(f"sequence length {clean.shape[1]} exceeds n_positions {n_ctx}")
  if steps < 1 or batch_size < 1:
    raise BaselineInputError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")


def torch_eap_ig_inputs(hf_model, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                        correct: Tensor, incorrect: Tensor, steps: int = 5, batch_size: int = 16,
                        full_logits: bool = False) -> Tensor:
  """EAP-IG-inputs edge scores for a `GPT2LMHeadModel`, in eager PyTorch.

  Args:
    hf_model: a `transformers.GPT2LMHeadModel` (its device and dtype are used; put it in eval mode).
    clean, corrupted: Long[Tensor, "batch pos"] token ids, BOS first, right padded, equal lengths.
    mask: Int[Tensor, "batch pos"] 1 on real tokens (padded keys are masked in attention).
    last: Long[Tensor, "batch"] index of each example's last real token (where the metric is read).
    correct, incorrect: Long[Tensor, "batch"] answer token ids; the metric is their logit
      difference.
    steps: number of interpolation steps m; alpha_k = k/m for k = 0..m-1.
    batch_size: examples per forward/backward.
    full_logits: compute the full [batch, pos, vocab] logits as the `eap` package does, instead of
      only the two answer logits at the last token (same scores, more work).

  Returns:
    Float[Tensor, "sender receiver"] scores in the metric's units (mean over examples), zero on
    invalid edges, on the model's device.
  """
  if hf_model.training:
    raise BaselineInputError("put the model in eval mode (hf_model.eval()): dropout is active")
  W = _weights(hf_model)
  check_inputs(clean, corrupted, mask, last, correct, incorrect, W["wpe"].shape[0], steps,
               batch_size)
  dev = W["wte"].device
  L, H = W["n_layers"], W["n_heads"]
  S, R = 1 + L * (H + 1), L * (3 * H + 1) + 1
  n = clean.shape[0]
  scores = torch.zeros(S, R, device=dev, dtype=torch.float32)
  clean, corrupted, mask, last, correct, incorrect = (
      t.to(dev) for t in (clean, corrupted, mask, last, correct, incorrect))
  for i in range(0, n, batch_size):
    sl = slice(i, i + batch_size)
    bl = last[sl]
    p = int(bl.max()) + 1  # later positions are padding: zero gradient, so trim them
    bm = mask[sl, :p].bool()
    causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
    allowed = (causal[None] & bm[:, None, :])[:, None]
    with torch.no_grad():
      pos = W["wpe"][:p][None]
      e_clean = W["wte"][clean[sl, :p]] + pos
      e_corr = W["wte"][corrupted[sl, :p]] + pos
      diff = _senders(W, e_corr, allowed) - _senders(W, e_clean, allowed)  # [b, p, S, d]
    total = None
    for k in range(steps):
      x0 = (e_corr + (k / steps) * (e_clean - e_corr)).detach().requires_grad_(True)
      g = _receiver_grads(W, x0, allowed, bl, correct[sl], incorrect[sl], n, full_logits)
      if total is None:
        total = g
      else:
        for t, gi in zip(total, g, strict=True):
          t.add_(gi)
    with torch.no_grad():
      for layer in range(L):
        up_attn = 1 + layer * (H + 1)
        r0 = layer * (3 * H + 1)
        scores[:up_attn, r0:r0 + 3 * H] += torch.einsum(
            "bpsd,bprd->sr", diff[:, :, :up_attn], total[2 * layer]).float()
        scores[:up_attn + H, r0 + 3 * H] += torch.einsum(
            "bpsd,bpd->s", diff[:, :, :up_attn + H], total[2 * layer + 1]).float()
      scores[:, R - 1] += torch.einsum("bpsd,bpd->s", diff, total[-1]).float()
  return scores / steps
