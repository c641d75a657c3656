"""What XLA is given: the size of the programs the attribution kernels compile (issue 30).

The programs are lowered, not compiled or run (`jit(...).lower(...)`, StableHLO text lines), so the
size tests are quick; the compile seconds and optimised-HLO sizes are the `compile` benchmark
suite's (`python -m benchmarks.run --suite=compile`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import contraction, exact
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.tasks import metrics as task_metrics

_COMMON = dict(d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32)


def _cfg(n_layers: int, **kw) -> models.ModelConfig:
  return models.ModelConfig(family="gpt2", n_layers=n_layers, **_COMMON, **kw)


@functools.cache
def _params(cfg):
  p = models.init_params(cfg, jax.random.PRNGKey(1))
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


def _kernel_lines(n_layers: int, steps: int, n_rows: int = 4) -> int:
  """Lines of the EAP-IG-inputs kernel's lowered StableHLO for a tiny GPT-2 of `n_layers`."""
  cfg = _cfg(n_layers)
  ds = tasks.make_induction(n_rows, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(n_rows))
  alphas = jnp.asarray(A.ig_alphas(steps), jnp.float32)
  lowered = RG.ig_inputs_batch.lower(cfg, ds.task, _params(cfg), batch, A.Patching(),
                                     alphas)
  return len(lowered.as_text().splitlines())


def test_eap_ig_kernel_does_not_grow_with_steps():
  """The IG steps are a `lax.scan`: 2 and 8 steps lower to programs of the same size."""
  assert _kernel_lines(2, 2) == _kernel_lines(2, 8)


def test_eap_ig_kernel_grows_at_most_linearly_with_layers():
  """The blocks are one scanned block; what is left per layer is a constant amount."""
  n1, n2, n4 = (_kernel_lines(n, 2) for n in (1, 2, 4))
  per_layer = n2 - n1
  assert n4 - n2 <= 2 * per_layer * 1.05 + 10, (n1, n2, n4)
  assert per_layer < n1, (n1, n2, n4)  # one more layer adds less than a whole 1-layer program


def test_contraction_does_not_grow_with_position_chunks():
  """The sender x receiver contraction scans over position chunks: 1 chunk and 8 chunks of the
  same positions lower to programs of the same size."""
  cfg = _cfg(2)
  b, p, S, L, H = 4, 8, models.edges.n_senders(cfg), cfg.n_layers, cfg.n_heads
  d, dh = cfg.d_model, cfg.d_head
  diff = jnp.zeros((b, p, S, d))
  P = jnp.zeros((L, b, p, 3 * H, dh))
  mlp, log = jnp.zeros((L, b, p, d)), jnp.zeros((b, p, d))
  per_pos = (L * (3 * H + 1) + 1) * d * 4
  lines = {}
  for chunks in (1, 8):
    f = jax.jit(functools.partial(contraction.contract_positions, cfg,
                                  chunk_bytes=per_pos * b * p / chunks))
    text = f.lower(_params(cfg), diff, P, mlp, log).as_text()
    assert f"tensor<{chunks}x{b * p // chunks}x{S}x{d}xf32>" in text  # really that many chunks
    lines[chunks] = len(text.splitlines())
  assert lines[1] == lines[8]


def _exact_scores(cfg, params, ds, scanned: bool, monkeypatch) -> np.ndarray:
  monkeypatch.setattr(exact, "scan_layers", lambda c, p: scanned)
  batch = next(ds.batches(len(ds)))
  abl = A.Patching()
  c_total, _, clean_logits = task_metrics.clean_metric(cfg, ds.task, params, batch)
  return exact._exact_batch(cfg, ds.task, abl, params, batch, valid_edges(cfg), float(c_total),
                            clean_logits, 64, True)


def _check_scan_matches_layers(cfg, ds, monkeypatch):
  params = _params(cfg)
  a = _exact_scores(cfg, params, ds, False, monkeypatch)
  b = _exact_scores(cfg, params, ds, True, monkeypatch)
  valid = valid_edges(cfg)
  assert np.abs(a[valid]).max() > 1e-2  # a real signal
  # Each score is m(edge ablated) - m(clean) of batch sums: the reruns' sums agree to float32
  # rounding of the sums themselves (measured: bitwise equal on the bundled toy; up to 8.5e-7
  # relative on the GPT-2 small shape at 147 edges per call, docs/performance.md).
  batch = next(ds.batches(len(ds)))
  c_total = float(task_metrics.clean_metric(cfg, ds.task, params, batch)[0])
  np.testing.assert_allclose(b[valid] + c_total, a[valid] + c_total, rtol=1e-6,
                             atol=1e-6 * abs(c_total))
  assert np.all(b[~valid] == 0)


@pytest.mark.slow
def test_exact_one_program_for_every_block_layer(monkeypatch):
  """Exact patching's edges into the blocks run through one scanned program (the receiver's layer
  is data), with the per-layer programs' scores."""
  cfg = _cfg(3)
  assert exact.scan_layers(cfg, _params(cfg))
  ds = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  jax.clear_caches()
  _check_scan_matches_layers(cfg, ds, monkeypatch)  # the scanned run comes last
  programs = exact.edge_chunk_scan._full._cache_size() + exact.edge_chunk_scan._fast._cache_size()
  per_layer = exact.edge_chunk._full._cache_size() + exact.edge_chunk._fast._cache_size()
  assert programs == 1  # every block layer (the per-layer run compiled 3 + the logits' one)
  assert per_layer == cfg.n_layers + 1


@pytest.mark.slow
@pytest.mark.families_matrix  # by hand: see pyproject.toml
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_exact_scan_other_families(family, monkeypatch):
  """Parallel blocks (NeoX) and GQA with a shared clean/corrupted prefix (Llama: the reruns run the
  suffix after the clean keys and values) through the scanned program."""
  kw = dict(gpt_neox=dict(positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                          act_fn="gelu", tied_embeddings=False),
            llama=dict(n_kv_heads=2, normalization="rmsnorm", positional="rotary", rotary_dim=8,
                       gated_mlp=True, mlp_bias=False, act_fn="silu", attn_bias=False,
                       attn_out_bias=False, tied_embeddings=False))[family]
  cfg = models.ModelConfig(family=family, n_layers=2, **_COMMON, **kw)
  ds = tasks.make_induction(4, 8, cfg.d_vocab, seed=0, bos_id=0)  # 16 tokens
  if family == "llama":  # a shared prefix: the corrupted prompts differ from token 10 on
    corrupted = np.array(ds.clean)
    corrupted[:, 10:] = (corrupted[:, 10:] + 7) % (cfg.d_vocab - 1) + 1
    ds = dataclasses.replace(ds, corrupted=corrupted)
  _check_scan_matches_layers(cfg, ds, monkeypatch)


def _exact_node_scores(cfg, params, ds, scanned: bool, monkeypatch) -> np.ndarray:
  monkeypatch.setattr(exact, "scan_layers", lambda c, p: scanned)
  batch = next(ds.batches(len(ds)))
  abl = A.Patching()
  c_total, _, clean_logits = task_metrics.clean_metric(cfg, ds.task, params, batch)
  return exact._exact_nodes_batch(cfg, ds.task, abl, params, batch, float(c_total), clean_logits,
                                  4, True)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_nodes_one_program_for_every_layer(family, monkeypatch):
  """Exact node patching runs the nodes of every layer through one scanned program (the layer is
  data; layer 0's extra input node is padded into the same chunk shape), with the per-layer
  programs' scores: GPT-2 (measured bitwise equal), and Llama (GQA, rotary; within 2e-6 of sums
  near 1: the ungrouped heads' attention is fused differently) whose reruns start after a shared
  clean prefix."""
  kw = dict(gpt2={}, llama=dict(n_kv_heads=2, normalization="rmsnorm", positional="rotary",
                                rotary_dim=8, gated_mlp=True, mlp_bias=False, act_fn="silu",
                                attn_bias=False, attn_out_bias=False, tied_embeddings=False))
  cfg = models.ModelConfig(family=family, n_layers=3, **_COMMON, **kw[family])
  params = _params(cfg)
  ds = tasks.make_induction(4, 8, cfg.d_vocab, seed=0, bos_id=0)
  if family == "llama":  # the corrupted prompts differ from token 10 on
    corrupted = np.array(ds.clean)
    corrupted[:, 10:] = (corrupted[:, 10:] + 7) % (cfg.d_vocab - 1) + 1
    ds = dataclasses.replace(ds, corrupted=corrupted)
  jax.clear_caches()
  a = _exact_node_scores(cfg, params, ds, False, monkeypatch)
  b = _exact_node_scores(cfg, params, ds, True, monkeypatch)
  assert exact.node_chunk_scan._full._cache_size() + exact.node_chunk_scan._fast._cache_size() == 1
  assert exact.node_chunk._full._cache_size() + exact.node_chunk._fast._cache_size() >= 3
  assert np.abs(a).max() > 1e-2  # a real signal
  batch = next(ds.batches(len(ds)))
  c_total = float(task_metrics.clean_metric(cfg, ds.task, params, batch)[0])
  np.testing.assert_allclose(b + c_total, a + c_total, rtol=1e-6, atol=1e-6 * abs(c_total))
