"""Gemma-3, Qwen3, Mistral, OLMo-2, Phi-3 and the RoPE types, as configuration of the one decoder:
fp32 logit parity with HF transformers on random checkpoints built here (sequences longer than
every sliding window), refusals that name the field, the scan over blocks, sites, edges, bf16."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.models import transformer as T
from tests.conftest import random_tokens, save_hf

_TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LONGROPE = dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.5],
                long_factor=[1.5, 2.0, 3.0, 5.0])


def hf_model(kind: str, seed: int = 0):
  """A tiny random HF causal LM of each new family (or RoPE type), norms and biases perturbed."""
  import torch
  import transformers as tf
  torch.manual_seed(seed)
  llama = dict(_TINY, num_hidden_layers=2, max_position_embeddings=16, tie_word_embeddings=False)
  if kind == "gemma3":  # two local, two global layers; global RoPE linearly scaled
    cfg = tf.Gemma3TextConfig(**_TINY, num_hidden_layers=4, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              query_pre_attn_scalar=12, max_position_embeddings=64,
                              rope_scaling={"rope_type": "linear", "factor": 2.0},
                              rope_theta=10000.0, rope_local_base_freq=100.0)
    cls = tf.Gemma3ForCausalLM
  elif kind == "qwen3":  # head_dim 12 != 32 / 4
    cfg = tf.Qwen3Config(**_TINY, num_hidden_layers=2, head_dim=12, max_position_embeddings=64,
                         tie_word_embeddings=True)
    cls = tf.Qwen3ForCausalLM
  elif kind == "mistral":
    cfg = tf.MistralConfig(**_TINY, num_hidden_layers=2, sliding_window=4,
                           max_position_embeddings=64, tie_word_embeddings=False)
    cls = tf.MistralForCausalLM
  elif kind == "olmo2":
    cfg = tf.Olmo2Config(**_TINY, num_hidden_layers=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    cls = tf.Olmo2ForCausalLM
  elif kind in ("phi3", "phi3_longrope"):
    extra = dict(rope_scaling=dict(LONGROPE), original_max_position_embeddings=8,
                 max_position_embeddings=32) if kind == "phi3_longrope" else {}
    cfg = tf.Phi3Config(**{**_TINY, "num_hidden_layers": 2, "sliding_window": 5,
                           "max_position_embeddings": 64, "tie_word_embeddings": False, **extra})
    cls = tf.Phi3ForCausalLM
  elif kind.startswith("llama_"):
    rope = {"llama_linear": {"rope_type": "linear", "factor": 3.0},
            "llama_dynamic": {"rope_type": "dynamic", "factor": 2.0},
            "llama_yarn": {"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 8}}[kind]
    cfg = tf.LlamaConfig(**llama, rope_scaling=rope)
    cls = tf.LlamaForCausalLM
  else:
    raise ValueError(kind)
  model = cls(cfg).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _err(ours, theirs) -> float:
  """max |difference| as a fraction of the logit scale."""
  return float(np.abs(np.asarray(ours) - theirs).max() / max(1.0, np.abs(theirs).max()))


NEW = ("gemma3", "qwen3", "mistral", "olmo2", "phi3")
ROPES = ("llama_linear", "llama_dynamic", "llama_yarn", "phi3_longrope")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, torch_one_thread):
  cache = {}

  def get(kind):
    if kind not in cache:
      hf = hf_model(kind)
      cache[kind] = hf, models.from_pretrained(save_hf(hf, tmp_path_factory.mktemp(kind)))
    return cache[kind]
  return get


@pytest.mark.parametrize("kind", NEW + ROPES)
def test_parity_with_transformers(kind, loaded):
  """fp32 logits equal HF's to 1e-4 of the logit scale, over 20 positions (every sliding window
  here is 4 or 5; dynamic RoPE's M is 16 and longrope's original context 8, so both rescale)."""
  hf, m = loaded(kind)
  tokens = random_tokens((2, 20), seed=1)
  err = _err(m(tokens), hf_logits(hf, tokens))
  print(f"{kind}: max |logit error| / scale = {err:.2e}")
  assert err <= 1e-4


@pytest.mark.parametrize("kind", ["llama_dynamic", "phi3_longrope"])
def test_input_dependent_rope_below_its_threshold(kind, loaded):
  """Short inputs: dynamic RoPE is plain RoPE, longrope uses its short factors (as HF)."""
  hf, m = loaded(kind)
  tokens = random_tokens((2, 7), seed=2)
  assert _err(m(tokens), hf_logits(hf, tokens)) <= 1e-4


def test_config_fields_of_each_family(loaded):
  g = loaded("gemma3")[1].cfg
  assert (g.family, g.qk_norm, g.rope_local_theta, g.sliding_layers) == ("gemma3", "head", 100.0,
                                                                         (0, 2))
  assert g.post_norms and g.pre_norms and g.rmsnorm_plus_one and g.layer_types_as_data
  assert g.attn_logit_softcap is None and g.final_logit_softcap is None
  assert g.attn_scale == pytest.approx(12 ** -0.5) and g.embed_scale == pytest.approx(32 ** 0.5)
  q = loaded("qwen3")[1].cfg
  assert (q.qk_norm, q.d_head, q.attn_bias) == ("head", 12, False)
  assert loaded("mistral")[1].cfg.sliding_layers == (0, 1)
  o = loaded("olmo2")[1].cfg
  assert (o.qk_norm, o.pre_norms, o.post_norms) == ("all", False, True)
  assert "ln1" not in loaded("olmo2")[1].params["blocks_0"]
  p = loaded("phi3_longrope")[1].cfg
  assert p.rope_scaling_dict["rope_type"] == "longrope" and p.sliding_layers == (0, 1)
  assert models.ModelConfig.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def _rewrite(path, **changes):
  cfg = json.load(open(path / "config.json"))
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  json.dump(cfg, open(path / "config.json", "w"))


def test_gemma3_hub_config_format(tmp_path, loaded):
  """The Hub's Gemma-3 config.json (rope_theta, rope_local_base_freq, rope_scaling and
  sliding_window_pattern; no layer_types) converts to the same model."""
  hf, m = loaded("gemma3")
  save_hf(hf, tmp_path)
  _rewrite(tmp_path, rope_parameters=None, layer_types=None, rope_theta=10000.0,
           rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
           sliding_window_pattern=2)
  cfg = json.load(open(tmp_path / "config.json"))
  assert models.pretrained.config_from_hf(cfg) == m.cfg


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"rope_type": "su-perb", "rope_theta": 1e4},
     r"rope_parameters.rope_type = 'su-perb'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "warp": 3},
     r"rope_parameters.warp = 3"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0, "mystery": 1},
     r"rope_scaling.mystery = 1"),
])
def test_unknown_rope_is_refused_naming_the_field(tmp_path, loaded, field, value, match):
  save_hf(loaded("mistral")[0], tmp_path)
  _rewrite(tmp_path, **{field: value})
  with pytest.raises(models.CheckpointError, match=match) as e:
    models.from_pretrained(tmp_path)
  assert "\n" not in str(e.value)


def test_bidirectional_gemma3_is_refused(tmp_path, loaded):
  save_hf(loaded("gemma3")[0], tmp_path)
  _rewrite(tmp_path, use_bidirectional_attention=True)
  with pytest.raises(models.CheckpointError, match="use_bidirectional_attention"):
    models.from_pretrained(tmp_path)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_gemma3_alternating_layers_run_as_one_scan(loaded):
  """The layer type (window, RoPE base) is scanned data: run_blocks over the stacked blocks gives
  the unrolled forward's activations."""
  _, m = loaded("gemma3")
  cfg, params = m.cfg, m.params
  assert T.layers_uniform(cfg)
  tokens = random_tokens((2, 11), seed=3)
  mask = np.ones_like(tokens, bool)
  mask[1, 8:] = False
  names = ("attn.hook_rot_q", "hook_resid_post")
  _, cache = models.forward(cfg, params, tokens, attention_mask=mask,
                            collect=[f"blocks.{li}.{n}" for li in range(4) for n in names])
  emb = models.embed_inputs(cfg, params, tokens, mask)
  for stacked in (T.stack_blocks(cfg, params), None):
    _, ys = T.run_blocks(cfg, params, emb, mask, collect=names, stacked=stacked)
    for li in range(4):
      for n in names:
        np.testing.assert_allclose(np.asarray(ys[n][li]), np.asarray(cache[f"blocks.{li}.{n}"]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", NEW)
def test_every_site_name_works(kind, loaded):
  """Every name in site_names is visited (collecting it) and the graph form's per-head inputs
  reproduce the logits."""
  _, m = loaded(kind)
  cfg, params = m.cfg, m.params
  tokens = random_tokens((2, 9), seed=4)
  names = models.site_names(cfg)
  per_head = [n for n in names if n.endswith(("_input",))]
  fused = [n for n in names if n not in per_head]
  logits, cache = models.forward(cfg, params, tokens, collect=fused)
  assert set(cache) == set(fused)
  if cfg.qk_norm != "none":
    assert "blocks.0.attn.hook_q_normed" in cache
  logits2, cache2 = models.forward(cfg, params, tokens, collect=per_head)
  assert set(cache2) == set(per_head)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=1e-5)


@pytest.mark.parametrize("kind", NEW)
def test_edge_graph_full_and_empty(kind, loaded):
  """The graph form with every edge live is the model; removing the edges into one head's q
  receiver changes only what that q reads (qk-norm sits inside the head for Qwen3/Gemma-3; for
  OLMo-2 the all-head q-norm then rescales the layer's other queries, as the model does)."""
  _, m = loaded(kind)
  cfg, params = m.cfg, m.params
  from jaxinterp.models import edges as E
  tokens = random_tokens((2, 9), seed=5)
  corrupt = random_tokens((2, 9), seed=6)
  ablated = T.sender_outputs(cfg, params, corrupt)
  w = jnp.ones((E.n_senders(cfg), E.n_receivers(cfg)))
  full = models.forward(cfg, params, tokens, edges=E.EdgePatch(w, ablated))
  np.testing.assert_allclose(np.asarray(full), np.asarray(models.forward(cfg, params, tokens)),
                             atol=2e-5)
  # All edges into every receiver removed: the run reads only the corrupted senders, so it is the
  # corrupted run.
  none = models.forward(cfg, params, tokens, edges=E.EdgePatch(jnp.zeros_like(w), ablated))
  np.testing.assert_allclose(np.asarray(none), np.asarray(models.forward(cfg, params, corrupt)),
                             atol=2e-5)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_bf16_loads_as_bf16_or_upcast(tmp_path, loaded):
  import torch
  hf, m32 = loaded("qwen3")
  save_hf(hf.to(torch.bfloat16), tmp_path)
  hf.to(torch.float32)
  m16 = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(m16.params)} == {jnp.dtype(jnp.bfloat16)}
  up = models.from_pretrained(tmp_path)  # the default upcasts to float32
  assert {x.dtype for x in jax.tree.leaves(up.params)} == {jnp.dtype(jnp.float32)}
  tokens = random_tokens((1, 9), seed=7)
  ref = np.asarray(m32(tokens))
  assert _err(up(tokens), ref) < 3e-2 and _err(m16(tokens), ref) < 1e-1


# The Hub config.json of three 8B-class models (Gemma-3-12B: its text_config), as published.
HUB_8B = {
    "Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    "Gemma-3-12B": dict(
        model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
        query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"factor": 8.0, "rope_type": "linear"}, max_position_embeddings=131072,
        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
        eos_token_id=1, pad_token_id=0),
    "Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        max_window_layers=36, hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
}
# Parameter counts: HF's (8,030,261,248; 11,766,034,176; 8,190,735,360) plus, with qk-norm, the
# shared [d_head] norm weights stored once per head (docs/models.md gives the bytes).
N_PARAMS = {"Llama-3.1-8B": 8_030_261_248, "Gemma-3-12B": 11_766_034_176 + 48 * 22 * 256,
            "Qwen3-8B": 8_190_735_360 + 36 * 38 * 128}


@pytest.mark.parametrize("name", HUB_8B)
def test_8b_shaped_configs_build_abstractly(name):
  """The config converts and its params build as shapes only (no weights)."""
  cfg = models.pretrained.config_from_hf(HUB_8B[name])
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == N_PARAMS[name]
  assert T.layers_uniform(cfg)  # Gemma-3's 5:1 local/global layers still scan
