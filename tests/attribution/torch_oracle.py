"""An independent plain-PyTorch graph-form GPT-2, used as a test oracle for attribution scores.

Test-only code. It reads the weights of a `transformers.GPT2LMHeadModel` and recomputes the model in
"graph form": every receiver (the q, k and v input of each head separately, each MLP input and the
logits input) reads

    x_r = sum_{s upstream of r} w[s, r] * live_s + (1 - w[s, r]) * ablated_s + (bias constants)

where the senders are the input node (token + position embedding), every head's output
`z_h @ W_O[h]` (without the attention output bias `b_O`, which stays in the residual as a constant)
and every MLP output (with its bias). On top of that forward it computes EAP, EAP-IG-inputs and
exact edge scores in the metric's units, for the logit-difference metric at each example's last real
token, averaged over examples.

It deliberately does not import jax or jaxinterp: jaxinterp's attribution is checked against it.
Everything is written for clarity, not speed (exact scores loop over edges in Python).

Index layout (the EAP-IG `graph.py` layout, as in `models/edges.py`):
- senders: 0 is `input`; layer l has heads at 1 + l*(H+1) + h and its MLP at 1 + l*(H+1) + H.
- receivers: layer l has q heads at l*(3H+1) + h, k heads at +H, v heads at +2H, the MLP at +3H;
  the logits receiver is last, at L*(3H+1).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.activations import ACT2FN

Tensor = torch.Tensor
BOS_GPT2 = 50256


class OracleInputError(ValueError):
  """Bad input to the torch oracle (shapes, dtypes or an unsupported model)."""


@dataclass(frozen=True)
class TaskBatch:
  """A tokenised clean/corrupted batch for the logit-difference metric (torch tensors, CPU).

  Attributes:
    clean: Long[Tensor, "batch pos"] clean prompts, BOS first, right padded.
    corrupted: Long[Tensor, "batch pos"] corrupted prompts, same lengths as `clean`.
    mask: Long[Tensor, "batch pos"] 1 on real tokens, 0 on padding.
    last: Long[Tensor, "batch"] index of each example's last real token.
    correct: Long[Tensor, "batch"] token id of the correct answer.
    incorrect: Long[Tensor, "batch"] token id of the incorrect answer.
  """

  clean: Tensor
  corrupted: Tensor
  mask: Tensor
  last: Tensor
  correct: Tensor
  incorrect: Tensor


def load_eap_csv_batch(csv_path: str | Path, tokenizer_json: str | Path, n: int = 16,
                       bos: int = BOS_GPT2, pad: int = BOS_GPT2) -> TaskBatch:
  """Tokenise the first `n` usable rows of an EAP-IG task CSV as TransformerLens does.

  BOS is prepended, prompts are right padded with `pad`, and rows whose clean and corrupted prompts
  tokenise to different lengths are skipped (EAP-IG requires equal lengths).
  """
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(tokenizer_json))
  rows = []
  with open(csv_path, newline="") as f:
    for row in csv.DictReader(f):
      c = [bos] + tok.encode(row["clean"], add_special_tokens=False).ids
      k = [bos] + tok.encode(row["corrupted"], add_special_tokens=False).ids
      if len(c) != len(k):
        continue
      rows.append((c, k, int(row["correct_idx"]), int(row["incorrect_idx"])))
      if len(rows) == n:
        break
  if len(rows) < n:
    raise OracleInputError(f"{csv_path} has only {len(rows)} usable rows, {n} requested")
  p = max(len(c) for c, _, _, _ in rows)
  clean = torch.full((n, p), pad, dtype=torch.long)
  corrupted = torch.full((n, p), pad, dtype=torch.long)
  mask = torch.zeros((n, p), dtype=torch.long)
  for i, (c, k, _, _) in enumerate(rows):
    clean[i, :len(c)] = torch.tensor(c)
    corrupted[i, :len(k)] = torch.tensor(k)
    mask[i, :len(c)] = 1
  return TaskBatch(clean, corrupted, mask, mask.sum(1) - 1,
                   torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]))


def random_task_batch(vocab: int, n: int = 12, pos: int = 10, seed: int = 0) -> TaskBatch:
  """Random token data with variable lengths (right padded), for tests without shared data.

  Each corrupted prompt differs from its clean prompt in one token, strictly between BOS and the
  last real token (as in IOI, where the answer position itself is unchanged).
  """
  if pos < 4:
    raise OracleInputError(f"pos must be >= 4, got {pos}")
  g = torch.Generator().manual_seed(seed)
  clean = torch.randint(0, vocab, (n, pos), generator=g)
  corrupted = clean.clone()
  lengths = torch.randint(pos // 2, pos + 1, (n,), generator=g)
  mask = (torch.arange(pos)[None, :] < lengths[:, None]).long()
  for i in range(n):
    j = int(torch.randint(1, int(lengths[i]) - 1, (1,), generator=g))  # not BOS, not the last
    corrupted[i, j] = (clean[i, j] + 1
                       + int(torch.randint(0, vocab - 1, (1,), generator=g))) % vocab
  clean = torch.where(mask.bool(), clean, 0)
  corrupted = torch.where(mask.bool(), corrupted, 0)
  answers = torch.randint(0, vocab, (n, 2), generator=g)
  answers[:, 1] = torch.where(answers[:, 1] == answers[:, 0], (answers[:, 0] + 1) % vocab,
                              answers[:, 1])
  return TaskBatch(clean, corrupted, mask, lengths - 1, answers[:, 0], answers[:, 1])


class GPT2GraphOracle:
  """Plain-torch graph-form GPT-2 built from a `transformers.GPT2LMHeadModel`'s weights.

  Args:
    hf_model: a `GPT2LMHeadModel` (any config of the GPT-2 family; weights are copied).
    dtype: compute dtype; float64 by default so that the oracle's own rounding is negligible.
  """

  def __init__(self, hf_model, dtype: torch.dtype = torch.float64):
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "gpt2":
      raise OracleInputError(f"GPT2GraphOracle needs a GPT-2 model, got {cfg.model_type!r}")
    if getattr(cfg, "add_cross_attention", False):
      raise OracleInputError("cross-attention GPT-2 models are not supported")
    self.dtype = dtype
    self.n_layers = cfg.n_layer
    self.n_heads = cfg.n_head
    self.d_model = cfg.n_embd
    self.d_head = cfg.n_embd // cfg.n_head
    self.eps = cfg.layer_norm_epsilon
    self.act: Callable[[Tensor], Tensor] = ACT2FN[cfg.activation_function]
    self.scales = []
    for layer in range(self.n_layers):
      s = self.d_head ** -0.5 if cfg.scale_attn_weights else 1.0
      if cfg.scale_attn_by_inverse_layer_idx:
        s /= float(layer + 1)
      self.scales.append(s)

    sd = {k: v.detach().to(dtype).clone() for k, v in hf_model.state_dict().items()}
    t = hf_model.transformer
    pre = "transformer."
    H, dh, d = self.n_heads, self.d_head, self.d_model
    self.W_E = sd[pre + "wte.weight"]                      # [vocab, d]
    self.W_pos = sd[pre + "wpe.weight"]                    # [n_ctx, d]
    self.W_U = sd["lm_head.weight"].T                      # [d, vocab]
    self.b_U = sd.get("lm_head.bias")
    self.lnf = (sd[pre + "ln_f.weight"], sd[pre + "ln_f.bias"])
    self.layers = []
    for layer in range(len(t.h)):
      p = f"{pre}h.{layer}."
      w_attn, b_attn = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # [d, 3d], [3d]

      def heads_w(i, w=w_attn):
        return w[:, i * d:(i + 1) * d].reshape(d, H, dh).permute(1, 0, 2).contiguous()

      def heads_b(i, b=b_attn):
        return b[i * d:(i + 1) * d].reshape(H, dh)

      self.layers.append(dict(
          ln1=(sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
          W_Q=heads_w(0), W_K=heads_w(1), W_V=heads_w(2),      # [H, d, dh]
          b_Q=heads_b(0), b_K=heads_b(1), b_V=heads_b(2),      # [H, dh]
          W_O=sd[p + "attn.c_proj.weight"].reshape(H, dh, d),  # [H, dh, d]
          b_O=sd[p + "attn.c_proj.bias"],                      # [d]
          ln2=(sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
          W_in=sd[p + "mlp.c_fc.weight"], b_in=sd[p + "mlp.c_fc.bias"],
          W_out=sd[p + "mlp.c_proj.weight"], b_out=sd[p + "mlp.c_proj.bias"],
      ))

  # ---------------------------------------------------------------------------------------------
  # Graph index layout.

  @property
  def n_senders(self) -> int:
    return 1 + self.n_layers * (self.n_heads + 1)

  @property
  def n_receivers(self) -> int:
    return self.n_layers * (3 * self.n_heads + 1) + 1

  def head_sender(self, layer: int, head: int) -> int:
    return 1 + layer * (self.n_heads + 1) + head

  def mlp_sender(self, layer: int) -> int:
    return 1 + layer * (self.n_heads + 1) + self.n_heads

  def head_receiver(self, layer: int, head: int, qkv: str) -> int:
    return layer * (3 * self.n_heads + 1) + "qkv".index(qkv) * self.n_heads + head

  def mlp_receiver(self, layer: int) -> int:
    return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

  @property
  def logits_receiver(self) -> int:
    return self.n_layers * (3 * self.n_heads + 1)

  def n_upstream(self, receiver: int) -> int:
    """Number of senders feeding `receiver`; they are always senders 0 .. n_upstream - 1."""
    if receiver == self.logits_receiver:
      return self.n_senders
    layer, j = divmod(receiver, 3 * self.n_heads + 1)
    attn_up = 1 + layer * (self.n_heads + 1)
    return attn_up if j < 3 * self.n_heads else attn_up + self.n_heads

  def valid_edges(self) -> np.ndarray:
    """Bool[ndarray, "sender receiver"]: True where the sender feeds the receiver."""
    v = np.zeros((self.n_senders, self.n_receivers), dtype=bool)
    for r in range(self.n_receivers):
      v[:self.n_upstream(r), r] = True
    return v

  # ---------------------------------------------------------------------------------------------
  # Forward.

  def _ln(self, x: Tensor, wb) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + self.eps) * wb[0] + wb[1]

  def _check(self, tokens: Tensor | None, attention_mask: Tensor, edge_weights, ablated,
             input_embeds: Tensor | None):
    ref = tokens if tokens is not None else input_embeds
    if ref is None:
      raise OracleInputError("pass tokens or input_embeds")
    b, p = ref.shape[:2]
    if tuple(attention_mask.shape) != (b, p):
      raise OracleInputError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {(b, p)}")
    if p > self.W_pos.shape[0]:
      raise OracleInputError(f"sequence length {p} exceeds the model's n_positions "
                             f"{self.W_pos.shape[0]}")
    if edge_weights is not None:
      sr = (self.n_senders, self.n_receivers)
      if tuple(edge_weights.shape) not in (sr, (b,) + sr):
        raise OracleInputError(f"edge_weights has shape {tuple(edge_weights.shape)}, expected "
                               f"{sr} or {(b,) + sr}")
      if ablated is None:
        raise OracleInputError("edge_weights given without ablated sender values")
      if tuple(ablated.shape) != (b, p, self.n_senders, self.d_model):
        raise OracleInputError(f"ablated has shape {tuple(ablated.shape)}, expected "
                               f"{(b, p, self.n_senders, self.d_model)}")

  def embed(self, tokens: Tensor) -> Tensor:
    """The input node's output: Float[Tensor, "batch pos d_model"] = W_E[tokens] + W_pos[pos]."""
    p = tokens.shape[1]
    return self.W_E[tokens] + self.W_pos[torch.arange(p)][None]

  def run(self, tokens: Tensor | None, attention_mask: Tensor,
          edge_weights: Tensor | None = None, ablated: Tensor | None = None,
          input_embeds: Tensor | None = None, retain_receiver_grads: bool = False):
    """Graph-form forward; returns (final residual, senders, receiver inputs).

    Args:
      tokens: Long[Tensor, "batch pos"] (ignored if input_embeds is given).
      attention_mask: Int[Tensor, "batch pos"], 1 on real tokens; padded keys are masked.
      edge_weights: Float[Tensor, "sender receiver"], or one matrix per example
        Float[Tensor, "batch sender receiver"], or None (all edges live: the plain model).
      ablated: Float[Tensor, "batch pos sender d_model"] counterfactual sender values.
      input_embeds: Float[Tensor, "batch pos d_model"] replaces the input node's output.
      retain_receiver_grads: call `retain_grad()` on every receiver input.

    Returns:
      final: Float[Tensor, "batch pos d_model"], the logits receiver's input (before ln_f).
      senders: Float[Tensor, "batch pos sender d_model"], this run's sender outputs.
      receivers: list of Float[Tensor, "batch pos d_model"], receiver inputs in receiver order.
    """
    self._check(tokens, attention_mask, edge_weights, ablated, input_embeds)
    if edge_weights is not None:
      edge_weights = edge_weights.to(self.dtype)
      ablated = ablated.to(self.dtype)
    x0 = self.embed(tokens) if input_embeds is None else input_embeds.to(self.dtype)
    b, p, d = x0.shape
    senders = [x0]
    receivers: list = [None] * self.n_receivers
    bias = torch.zeros(d, dtype=self.dtype)  # accumulated b_O constants in the residual

    def read(r: int) -> Tensor:
      n_up = self.n_upstream(r)
      assert n_up == len(senders)
      live = torch.stack(senders, dim=2)  # [b, p, n_up, d]
      if edge_weights is None:
        x = live.sum(2)
      else:
        w = edge_weights[..., :n_up, r]
        if w.ndim == 1:
          w = w.expand(b, n_up)
        x = torch.einsum("bpsd,bs->bpd", live, w) + torch.einsum(
            "bpsd,bs->bpd", ablated[:, :, :n_up], 1 - w)
      x = x + bias
      if retain_receiver_grads and x.requires_grad:
        x.retain_grad()
      receivers[r] = x
      return x

    keep = attention_mask.bool()
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    allowed = causal[None] & keep[:, None, :]  # [b, q, k]
    neg = torch.finfo(self.dtype).min
    for layer, W in enumerate(self.layers):
      outs = []
      ins = [[read(self.head_receiver(layer, h, c)) for c in "qkv"] for h in range(self.n_heads)]
      for h in range(self.n_heads):
        xq, xk, xv = (self._ln(x, W["ln1"]) for x in ins[h])
        q = xq @ W["W_Q"][h] + W["b_Q"][h]
        k = xk @ W["W_K"][h] + W["b_K"][h]
        v = xv @ W["W_V"][h] + W["b_V"][h]
        s = torch.einsum("bqe,bke->bqk", q, k) * self.scales[layer]
        s = torch.where(allowed, s, neg)
        z = torch.einsum("bqk,bke->bqe", torch.softmax(s, -1), v)
        outs.append(z @ W["W_O"][h])
      senders.extend(outs)
      bias = bias + W["b_O"]
      xm = self._ln(read(self.mlp_receiver(layer)), W["ln2"])
      senders.append(self.act(xm @ W["W_in"] + W["b_in"]) @ W["W_out"] + W["b_out"])
    final = read(self.logits_receiver)
    return final, torch.stack(senders, dim=2), receivers

  def unembed(self, final: Tensor) -> Tensor:
    """ln_f then the unembedding: [..., d_model] -> [..., vocab]."""
    y = self._ln(final, self.lnf) @ self.W_U
    return y if self.b_U is None else y + self.b_U

  def forward(self, tokens: Tensor, attention_mask: Tensor, edge_weights: Tensor | None = None,
              ablated: Tensor | None = None) -> Tensor:
    """Graph-form forward: Float[Tensor, "batch pos vocab"] logits (w=None is the plain model)."""
    with torch.no_grad():
      final, _, _ = self.run(tokens, attention_mask, edge_weights, ablated)
      return self.unembed(final)

  def senders(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    """Sender outputs of a plain run: Float[Tensor, "batch pos sender d_model"]."""
    with torch.no_grad():
      return self.run(tokens, attention_mask)[1]

  def logit_diff(self, final: Tensor, last: Tensor, correct: Tensor, incorrect: Tensor) -> Tensor:
    """Per-example logit[correct] - logit[incorrect] at the last real token: Float[Tensor, "batch"].
    """
    b = final.shape[0]
    for name, t in (("last", last), ("correct", correct), ("incorrect", incorrect)):
      if tuple(t.shape) != (b,):
        raise OracleInputError(f"{name} has shape {tuple(t.shape)}, expected ({b},)")
    y = self._ln(final[torch.arange(b), last], self.lnf)  # [b, d]
    d = (y * (self.W_U[:, correct] - self.W_U[:, incorrect]).T).sum(-1)
    if self.b_U is not None:
      d = d + self.b_U[correct] - self.b_U[incorrect]
    return d

  def metric(self, tokens: Tensor | None, attention_mask: Tensor, last: Tensor, correct: Tensor,
             incorrect: Tensor, edge_weights: Tensor | None = None,
             ablated: Tensor | None = None, input_embeds: Tensor | None = None) -> Tensor:
    """Per-example logit difference of a graph-form run: Float[Tensor, "batch"] (no grad)."""
    with torch.no_grad():
      final, _, _ = self.run(tokens, attention_mask, edge_weights, ablated, input_embeds)
      return self.logit_diff(final, last, correct, incorrect)

  # ---------------------------------------------------------------------------------------------
  # Scores, all [sender, receiver] float64 numpy arrays in the metric's units (0 on invalid edges).

  def _scores_from_grads(self, diff: Tensor, grads: list) -> np.ndarray:
    scores = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.float64)
    for r, g in enumerate(grads):
      n_up = self.n_upstream(r)
      scores[:n_up, r] = torch.einsum("bpsd,bpd->s", diff[:, :, :n_up], g).to(torch.float64)
    return scores.numpy()

  def _receiver_grads(self, tokens, mask, last, correct, incorrect, input_embeds=None) -> list:
    """Gradients of the mean metric with respect to every receiver input, at one input."""
    if input_embeds is not None:
      input_embeds = input_embeds.detach().clone().requires_grad_(True)
      final, _, recv = self.run(None, mask, input_embeds=input_embeds, retain_receiver_grads=True)
    else:
      # Make the input node's output a leaf that requires grad so every receiver is in the graph.
      x0 = self.embed(tokens).requires_grad_(True)
      final, _, recv = self.run(None, mask, input_embeds=x0, retain_receiver_grads=True)
    self.logit_diff(final, last, correct, incorrect).mean().backward()
    return [x.grad.detach() for x in recv]

  def eap_scores(self, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                 correct: Tensor, incorrect: Tensor) -> np.ndarray:
    """EAP: score[s, r] = mean_i sum_pos (a_s^corrupt - a_s^clean) . dm/dx_r at the clean input."""
    self._check_pair(clean, corrupted, mask)
    diff = self.senders(corrupted, mask) - self.senders(clean, mask)
    grads = self._receiver_grads(clean, mask, last, correct, incorrect)
    return self._scores_from_grads(diff, grads)

  def eap_ig_inputs_scores(self, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                           correct: Tensor, incorrect: Tensor, steps: int = 5) -> np.ndarray:
    """EAP-IG-inputs: gradients averaged over inputs x(a_k) = corrupt + a_k (clean - corrupt).

    a_k = k / steps for k = 0 .. steps-1 (the `eap` package's convention), times the sender
    difference (a^corrupt - a^clean) from separate clean and corrupted runs.
    """
    if steps < 1:
      raise OracleInputError(f"steps must be >= 1, got {steps}")
    self._check_pair(clean, corrupted, mask)
    a_clean, a_corr = self.senders(clean, mask), self.senders(corrupted, mask)
    e_clean, e_corr = a_clean[:, :, 0], a_corr[:, :, 0]
    total = None
    for k in range(steps):
      x = e_corr + (k / steps) * (e_clean - e_corr)
      g = self._receiver_grads(None, mask, last, correct, incorrect, input_embeds=x)
      total = g if total is None else [t + gi for t, gi in zip(total, g, strict=True)]
    return self._scores_from_grads(a_corr - a_clean, [t / steps for t in total])

  def exact_scores(self, clean: Tensor, corrupted: Tensor, mask: Tensor, last: Tensor,
                   correct: Tensor, incorrect: Tensor, edges_per_run: int = 16) -> np.ndarray:
    """Exact: mean m(edge s->r ablated to the corrupted run) - mean m(clean), for every valid edge.

    Each edge gets its own weight matrix (all ones but w[s, r] = 0); `edges_per_run` edges are
    evaluated per forward by tiling the examples, which only saves Python overhead.
    """
    self._check_pair(clean, corrupted, mask)
    if edges_per_run < 1:
      raise OracleInputError(f"edges_per_run must be >= 1, got {edges_per_run}")
    n = clean.shape[0]
    ablated = self.senders(corrupted, mask)
    base = self.metric(clean, mask, last, correct, incorrect).mean()
    scores = np.zeros((self.n_senders, self.n_receivers))
    edges = list(zip(*np.nonzero(self.valid_edges()), strict=True))
    for i in range(0, len(edges), edges_per_run):
      chunk = edges[i:i + edges_per_run]
      e = len(chunk)
      w = torch.ones(e, self.n_senders, self.n_receivers, dtype=self.dtype)
      for j, (s, r) in enumerate(chunk):
        w[j, s, r] = 0.0
      m = self.metric(clean.repeat(e, 1), mask.repeat(e, 1), last.repeat(e), correct.repeat(e),
                      incorrect.repeat(e), w.repeat_interleave(n, 0), ablated.repeat(e, 1, 1, 1))
      for j, (s, r) in enumerate(chunk):
        scores[s, r] = float(m[j * n:(j + 1) * n].mean() - base)
    return scores

  def _check_pair(self, clean: Tensor, corrupted: Tensor, mask: Tensor):
    if clean.shape != corrupted.shape:
      raise OracleInputError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
                             "must have equal shapes (equal token lengths)")
    if clean.shape != mask.shape:
      raise OracleInputError(f"mask {tuple(mask.shape)} must match tokens {tuple(clean.shape)}")
