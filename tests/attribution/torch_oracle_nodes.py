"""Plain-PyTorch oracles for information flow routes and node/neuron attribution, written from the
`eap` package's definitions (`attribute.py: get_scores_information_flow_routes`,
`attribute_node.py`), on the weights of a `tests.attribution.torch_oracle.GPT2GraphOracle`.

Test-only code; it imports neither jax nor jaxinterp. Node gradients come from a separate plain
(non graph-form) GPT-2 forward that keeps every node's output as a tensor with `retain_grad()`,
as `eap`'s backward hooks at `hook_embed`, `attn.hook_result` and `hook_mlp_out` see them.
Scores are float64 numpy arrays in the metric's units (logit difference), averaged over examples.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.attribution.torch_oracle import GPT2GraphOracle

Tensor = torch.Tensor


def ifr_scores(o: GPT2GraphOracle, tokens: Tensor, mask: Tensor,
               token_input: bool = True) -> np.ndarray:
  """`eap`'s information flow routes: [sender, receiver] mean over examples of the position-mean
  of prox[s] / sum_s' prox[s'], prox[s] = clamp(||x_r||_1 - ||o_s - x_r||_1, min=0)."""
  with torch.no_grad():
    _, senders, receivers = o.run(tokens, mask)
    if token_input:  # eap's input node is hook_embed: the token embedding only
      senders = senders.clone()
      senders[:, :, 0] = o.W_E[tokens]
    lengths = mask.sum(1).to(o.dtype)
    scores = np.zeros((o.n_senders, o.n_receivers))
    for r, x in enumerate(receivers):
      n_up = o.n_upstream(r)
      up = senders[:, :, :n_up]  # [b, p, n_up, d]
      prox = torch.clamp(x.abs().sum(-1, keepdim=True)
                         - (up - x[:, :, None]).abs().sum(-1), min=0)  # [b, p, n_up]
      total = prox.sum(-1, keepdim=True)
      # eap divides by zero where no sender is proximate (NaN); both sides count such positions 0.
      importance = torch.where(total > 0, prox / torch.where(total > 0, total, 1), 0)
      importance = importance * mask[:, :, None].to(o.dtype)
      per_example = importance.sum(1) / lengths[:, None]  # [b, n_up]
      scores[:n_up, r] = per_example.mean(0).numpy()
  return scores


def _node_forward(o: GPT2GraphOracle, x0: Tensor, mask: Tensor):
  """A plain GPT-2 forward from the input node's output x0 [b, p, d]; returns (final residual,
  node outputs in sender order, each [b, p, d] with `retain_grad()` when x0 requires grad)."""
  b, p, d = x0.shape
  outs = [x0]
  keep = mask.bool()
  allowed = torch.ones(p, p, dtype=torch.bool).tril()[None] & keep[:, None, :]
  neg = torch.finfo(o.dtype).min
  resid = x0
  for layer, W in enumerate(o.layers):
    xn = o._ln(resid, W["ln1"])
    heads = []
    for h in range(o.n_heads):
      q = xn @ W["W_Q"][h] + W["b_Q"][h]
      k = xn @ W["W_K"][h] + W["b_K"][h]
      v = xn @ W["W_V"][h] + W["b_V"][h]
      s = torch.where(allowed, torch.einsum("bqe,bke->bqk", q, k) * o.scales[layer], neg)
      out = torch.einsum("bqk,bke->bqe", torch.softmax(s, -1), v) @ W["W_O"][h]
      if out.requires_grad:
        out.retain_grad()
      heads.append(out)
    resid = resid + sum(heads) + W["b_O"]
    mlp = o.act(o._ln(resid, W["ln2"]) @ W["W_in"] + W["b_in"]) @ W["W_out"] + W["b_out"]
    if mlp.requires_grad:
      mlp.retain_grad()
    resid = resid + mlp
    outs += heads + [mlp]
  return resid, outs


def node_scores(o: GPT2GraphOracle, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                correct: Tensor, incorrect: Tensor, steps: int | None = None,
                neuron: bool = False) -> np.ndarray:
  """`attribute_node`'s EAP (steps=None) or EAP-IG-inputs (gradients averaged over inputs
  corrupt + k/steps (clean - corrupt), k = 1..steps): per node s, mean over examples of
  sum_pos (a_s^corrupt - a_s^clean) . dm/da_s ([sender], or [sender, d_model] with `neuron`)."""
  diff = o.senders(corrupted, mask) - o.senders(clean, mask)  # [b, p, S, d]
  e_clean, e_corr = o.embed(clean), o.embed(corrupted)
  alphas = [1.0] if steps is None else [k / steps for k in range(1, steps + 1)]
  total = torch.zeros(o.n_senders, o.d_model, dtype=o.dtype)
  for a in alphas:
    x0 = (e_corr + a * (e_clean - e_corr)).detach().requires_grad_(True)
    final, outs = _node_forward(o, x0, mask)
    o.logit_diff(final, last, correct, incorrect).mean().backward()
    grads = torch.stack([x0.grad] + [t.grad for t in outs[1:]], 2)  # [b, p, S, d]
    total += torch.einsum("bpsd,bpsd->sd", diff, grads.detach())
  total = total / len(alphas)
  return (total if neuron else total.sum(-1)).numpy()


def exact_node_scores(o: GPT2GraphOracle, clean: Tensor, corrupted: Tensor, mask: Tensor,
                      last: Tensor, correct: Tensor, incorrect: Tensor) -> np.ndarray:
  """`attribute_node`'s exact: mean m(every outgoing edge of s ablated) - mean m(clean), [sender].
  """
  ablated = o.senders(corrupted, mask)
  base = o.metric(clean, mask, last, correct, incorrect).mean()
  out = np.zeros(o.n_senders)
  for s in range(o.n_senders):
    w = torch.ones(o.n_senders, o.n_receivers, dtype=o.dtype)
    w[s] = 0.0
    out[s] = float(o.metric(clean, mask, last, correct, incorrect, w, ablated).mean() - base)
  return out


def neuron_circuit_metric(o: GPT2GraphOracle, clean: Tensor, corrupted: Tensor, mask: Tensor,
                          last: Tensor, correct: Tensor, incorrect: Tensor,
                          keep: np.ndarray) -> float:
  """`eap`'s evaluate_graph for a neuron circuit: every receiver reads, per sender s and output
  dimension i, the live value where keep[s, i] else the ablated (corrupted) one. Mean metric."""
  ablated = o.senders(corrupted, mask)
  keep_t = torch.tensor(keep, dtype=o.dtype)
  with torch.no_grad():
    b, p = clean.shape
    x0 = o.embed(clean)
    x0 = keep_t[0] * x0 + (1 - keep_t[0]) * ablated[:, :, 0]
    resid = x0
    keep_mask = mask.bool()
    allowed = torch.ones(p, p, dtype=torch.bool).tril()[None] & keep_mask[:, None, :]
    neg = torch.finfo(o.dtype).min
    for layer, W in enumerate(o.layers):
      xn = o._ln(resid, W["ln1"])
      heads = 0
      for h in range(o.n_heads):
        q = xn @ W["W_Q"][h] + W["b_Q"][h]
        k = xn @ W["W_K"][h] + W["b_K"][h]
        v = xn @ W["W_V"][h] + W["b_V"][h]
        sc = torch.where(allowed, torch.einsum("bqe,bke->bqk", q, k) * o.scales[layer], neg)
        out = torch.einsum("bqk,bke->bqe", torch.softmax(sc, -1), v) @ W["W_O"][h]
        s = o.head_sender(layer, h)
        heads = heads + keep_t[s] * out + (1 - keep_t[s]) * ablated[:, :, s]
      resid = resid + heads + W["b_O"]
      mlp = o.act(o._ln(resid, W["ln2"]) @ W["W_in"] + W["b_in"]) @ W["W_out"] + W["b_out"]
      s = o.mlp_sender(layer)
      resid = resid + keep_t[s] * mlp + (1 - keep_t[s]) * ablated[:, :, s]
    return float(o.logit_diff(resid, last, correct, incorrect).mean())
