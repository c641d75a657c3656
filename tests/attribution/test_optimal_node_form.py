"""Optimal ablation's per-sender forward: the plain forward with one node's output replaced
(`optimal.ablated_logits`, blocks scanned or not) equals the graph form with that sender's row of
edge weights at 0 (`optimal.ablated_logits_graph`), in the losses and in their gradients w.r.t. the
constants, for GPT-2, NeoX (parallel blocks) and Llama (GQA); post-norm configs keep the graph
form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import tasks
from jaxinterp.attribution import optimal as O
from jaxinterp.models import edges as E
from jaxinterp.models.transformer import embed_inputs, forward, stack_blocks
from tests.attribution.test_receiver_grads import CONFIGS, _params


def _losses(cfg, params, batch, objective, form):
  """(per-sender loss sums [S], their gradient w.r.t. the constants [S, d_model]) for random
  constants, every sender ablated in turn by `form` ("graph", "scan" or "unrolled")."""
  values = jax.random.normal(jax.random.PRNGKey(1), (E.n_senders(cfg), cfg.d_model))
  clean = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  emb = embed_inputs(cfg, params, batch.clean, batch.mask)
  stacked = stack_blocks(cfg, params) if form == "scan" else None

  def total(v):
    def one(s):
      if form == "graph":
        logits = O.ablated_logits_graph(cfg, params, batch, v, s)
      else:
        logits = O.ablated_logits(cfg, params, stacked, batch, v, s, emb)
      return O._token_losses(objective, logits, clean, batch)[0]
    per = jax.lax.map(one, jnp.arange(E.n_senders(cfg)))
    return per.sum(), per

  (_, per), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(values)
  return np.asarray(per), np.asarray(grad)


@pytest.mark.parametrize("family,objective", [("gpt2", "lm")] + [
    pytest.param(f, o, marks=pytest.mark.slow)
    for f, o in [("gpt2", "kl"), ("gpt_neox", "lm"), ("gpt_neox", "kl"), ("llama", "lm"),
                 ("llama", "kl")]])
def test_node_form_equals_the_graph_form(family, objective):
  cfg = CONFIGS[family]
  assert O.node_form(cfg)
  params = _params(cfg)
  batch = next(iter(tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0).batches(6)))
  ref, gref = _losses(cfg, params, batch, objective, "graph")
  assert np.std(ref) > 1e-3  # the senders' ablations differ
  for form in ("scan", "unrolled"):
    per, grad = _losses(cfg, params, batch, objective, form)
    # float32: the same terms summed in another order (measured: up to 2.4e-7 and 5.6e-7)
    np.testing.assert_allclose(per, ref, rtol=2e-6, atol=0)
    np.testing.assert_allclose(grad, gref, rtol=0, atol=2e-6 * np.abs(gref).max())


def test_post_norms_keep_the_graph_form():
  assert not O.node_form(CONFIGS["gemma2"])


def test_chunks_give_the_same_gradient_in_less_memory():
  """`oa_chunk` senders at a time: the same losses and gradient as all at once, and (each chunk's
  forward recomputed in the backward pass) temporaries of about one chunk, not of every chunk."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  batch = next(iter(tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0).batches(6)))
  values = jax.random.normal(jax.random.PRNGKey(1), (E.n_senders(cfg), cfg.d_model))

  def grad_of(chunk):
    return jax.jit(jax.value_and_grad(
        lambda v: O.sender_losses(cfg, "lm", chunk, params, batch, v).sum()))

  (whole, g_whole), (part, g_part) = grad_of(None)(values), grad_of(2)(values)
  np.testing.assert_allclose(part, whole, rtol=1e-6)
  np.testing.assert_allclose(g_part, g_whole, rtol=0, atol=1e-6 * np.abs(g_whole).max())
  temp = {c: grad_of(c).lower(values).compile().memory_analysis().temp_size_in_bytes
          for c in (None, 2)}
  assert temp[2] < 0.5 * temp[None], temp  # 1.25 MB against 3.75 MB (4.2 MB without recompute)


def test_default_chunk_is_as_many_senders_as_fit(monkeypatch):
  """`oa_chunk=None`: every sender at once where their activations fit the budget (the tests'
  models, the toy), as many as fit where not (GPT-2 small at 16 rows of 21 tokens in 4 GB: a
  few), at least one; the step then runs the program of that chunk."""
  cfg = CONFIGS["gpt2"]
  assert O.oa_chunk_size(cfg, 16, 32) == E.n_senders(cfg)
  gpt2_small = dataclasses.replace(cfg, d_model=768, n_layers=12, n_heads=12, d_head=64,
                                   d_mlp=3072, d_vocab=50257, n_ctx=1024)
  few = O.oa_chunk_size(gpt2_small, 16, 21, 4e9)
  assert 1 < few < 16 < E.n_senders(gpt2_small)
  assert O.oa_chunk_size(gpt2_small, 4, 21, 4e9) > few  # fewer rows, more senders at once
  assert O.oa_chunk_size(gpt2_small, 16, 21, 1.0) == 1
  params = _params(cfg)
  batch = next(iter(tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0).batches(6)))
  values = jnp.zeros((E.n_senders(cfg), cfg.d_model))
  seen = []

  def two(c, b, p):
    seen.append((c, b, p))
    return 2

  monkeypatch.setattr(O, "oa_chunk_size", two)

  def text(chunk):
    fn = jax.jit(lambda v: O.sender_losses.__wrapped__(cfg, "lm", chunk, params, batch, v))
    return fn.lower(values).as_text()

  assert text(None) == text(2) and seen == [(cfg, *batch.clean.shape)]
