"""Every circuit method runs on a small random model of each new family (Gemma-3, Qwen3, Mistral,
OLMo-2, Phi-3), exact patching equals a full rerun without the edge, and DAS trains on each."""

import functools

import jax
import numpy as np
import optax
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.interventions import Where
from jaxinterp.interventions import training as tr

_COMMON = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=48, d_vocab=50, n_ctx=32,
               normalization="rmsnorm", positional="rotary", gated_mlp=True, mlp_bias=False,
               attn_bias=False, attn_out_bias=False, act_fn="silu", tied_embeddings=False)
# What models.convert makes of each family's config.json, at test size (sliding windows of 3 over
# sequences of 6+ positions).
CONFIGS = {
    "gemma3": models.ModelConfig(**{**_COMMON, "act_fn": "gelu_pytorch_tanh"}, family="gemma3",
                                 d_head=8, rotary_dim=8, rmsnorm_plus_one=True, post_norms=True,
                                 qk_norm="head", embed_scale=32 ** 0.5, attn_scale=12 ** -0.5,
                                 sliding_window=3, sliding_layers=(0,), rope_local_theta=100.0,
                                 rope_scaling=(("factor", 2.0), ("rope_type", "linear")),
                                 layer_types_as_data=True),
    "qwen3": models.ModelConfig(**_COMMON, family="qwen3", d_head=12, rotary_dim=12,
                                qk_norm="head"),
    "mistral": models.ModelConfig(**_COMMON, family="mistral", d_head=8, rotary_dim=8,
                                  sliding_window=3, sliding_layers=(0, 1)),
    "olmo2": models.ModelConfig(**_COMMON, family="olmo2", d_head=8, rotary_dim=8,
                                pre_norms=False, post_norms=True, qk_norm="all"),
    "phi3": models.ModelConfig(**_COMMON, family="phi3", d_head=8, rotary_dim=8, sliding_window=3,
                               sliding_layers=(0, 1),
                               rope_scaling=(("attention_factor", 1.2),
                                             ("long_factor", (1.5, 2.0, 3.0, 5.0)),
                                             ("original_max_position_embeddings", 4),
                                             ("rope_type", "longrope"),
                                             ("short_factor", (1.0, 1.3, 1.7, 2.5)))),
}
FAMILIES = tuple(CONFIGS)


@functools.cache
def _params(family):
  """Random params, weights scaled up (and 1-D params perturbed) so scores are far from rounding
  noise."""
  p = models.init_params(CONFIGS[family], jax.random.PRNGKey(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))
  return jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else
                      x + 0.1 * jax.random.normal(next(keys), x.shape), p)


def _data(cfg):
  return tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_scores_equal_a_full_rerun_and_eap_runs(family):
  """Exact patching (fused-head reruns from the receiver's layer) equals evaluating the graph-form
  forward with that one edge removed; EAP's scores are finite and zero on invalid edges."""
  cfg, params = CONFIGS[family], _params(family)
  data = _data(cfg)
  valid = valid_edges(cfg)
  eap = A.attribute(cfg, params, data, method="EAP", batch_size=6, quiet=True)
  assert np.all(np.isfinite(eap.scores)) and np.all(eap.scores[~valid] == 0)
  assert np.abs(eap.scores[valid]).max() > 1e-4
  ex = A.attribute(cfg, params, data, method="exact", batch_size=6, quiet=True)
  g = Graph.from_config(cfg)
  m_full, _ = V.baselines(cfg, params, data, batch_size=6)
  np.testing.assert_allclose(ex.clean_metric, m_full, rtol=1e-5)
  s_idx, r_idx = np.nonzero(g.valid)
  rng = np.random.RandomState(0)
  logits = np.flatnonzero(r_idx == r_idx.max())
  mlp = np.flatnonzero((r_idx % (3 * cfg.n_heads + 1)) == 3 * cfg.n_heads)
  pick = np.concatenate([rng.choice(s_idx.size, 8, replace=False), rng.choice(logits, 1),
                         rng.choice(mlp, 2)])
  weights = []
  for k in pick:
    w = g.full().edge_weights()
    w[s_idx[k], r_idx[k]] = 0
    weights.append(w)
  metric = V.evaluate_circuits(cfg, params, data, np.stack(weights), batch_size=6, chunk=6,
                               quiet=True)
  got, want = ex.scores[s_idx[pick], r_idx[pick]], metric - m_full
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()), rtol=1e-4)


SMALL_OPTIONS = dict(ig_steps=2, mask_steps=4, mask_batch=4, ugs_samples=2, acdc_metric="task")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(A.METHODS))
@pytest.mark.slow
@pytest.mark.families_matrix  # not in CI: see the marker's description in pyproject.toml
def test_every_registered_method_runs_on_the_family(family, name):
  """The contract's core per family: shape, zeros on invalid edges, finite, non-trivial."""
  cfg, params = CONFIGS[family], _params(family)
  method = A.get_method(name)
  out = A.attribute(cfg, params, _data(cfg), method=name, batch_size=6, quiet=True,
                    **method.options_among(SMALL_OPTIONS))
  valid = valid_edges(cfg)
  assert out.scores.shape == valid.shape and np.all(out.scores[~valid] == 0)
  assert np.all(np.isfinite(out.scores)) and np.abs(out.scores[valid]).max() > 0


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow, pytest.mark.by_hand])
                                    if f in ("gemma3", "qwen3") else f for f in FAMILIES])
def test_das_interchange_trains(family):
  """A rotated-space interchange intervention on the residual stream trains (the loss falls) and
  the model's params are untouched."""
  cfg, params = CONFIGS[family], _params(family)
  r = np.random.RandomState(0)
  base = r.randint(1, cfg.d_vocab, (32, 5)).astype(np.int32)
  src = r.randint(1, cfg.d_vocab, (32, 5)).astype(np.int32)
  data = {"base": base, "source": src, "label": src[:, 1]}
  site = "blocks.0.hook_resid_post"
  tmpl = {site: tr.init_rotated_space(jax.random.PRNGKey(1), cfg.d_model, 4,
                                      where=Where.of(positions=4))}
  opt = optax.adam(5e-2)
  tp = tr.trainable_params(tmpl)
  state = opt.init(tp)
  step = tr.make_train_step(cfg, opt)
  losses = []
  for _ in range(12):
    tp, state, loss, _ = step(tp, state, tmpl, params, data)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
