"""Model core: HF parity for every family and file format, padding, converted checkpoints, errors.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.runtime import inputs
from tests.conftest import FAMILIES, SHARED, build_hf_model, random_tokens, requires_shared, save_hf


def hf_logits(model, tokens, mask=None):
  import torch
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
    return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


@pytest.mark.parametrize("kind", FAMILIES)
def test_parity_safetensors(kind, tmp_path):
  hf = build_hf_model(kind)
  m = models.from_pretrained(save_hf(hf, tmp_path))
  tokens = random_tokens((3, 13))
  err = np.abs(np.asarray(m(tokens)) - hf_logits(hf, tokens)).max()
  print(f"{kind}: max |logit error| = {err:.2e}")
  assert err < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_parity_sharded_safetensors(kind, tmp_path):
  hf = build_hf_model(kind, seed=1)
  save_hf(hf, tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert not os.path.exists(tmp_path / "model.safetensors")
  m = models.from_pretrained(tmp_path)
  tokens = random_tokens((2, 9), seed=3)
  assert np.abs(np.asarray(m(tokens)) - hf_logits(hf, tokens)).max() < 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_parity_pytorch_bin(kind, tmp_path):
  import torch
  hf = build_hf_model(kind, seed=2)
  hf.config.save_pretrained(tmp_path)
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  m = models.from_pretrained(tmp_path)
  tokens = random_tokens((2, 7), seed=4)
  assert np.abs(np.asarray(m(tokens)) - hf_logits(hf, tokens)).max() < 1e-4


_BY_HAND = [pytest.mark.slow, pytest.mark.by_hand]  # the test budgets (pyproject.toml)


@pytest.mark.parametrize("kind", [k if k == "gpt2" else pytest.param(k, marks=_BY_HAND)
                                  for k in FAMILIES])
def test_right_padding_keeps_real_positions(kind, tmp_path):
  hf = build_hf_model(kind)
  m = models.from_pretrained(save_hf(hf, tmp_path))
  tokens = random_tokens((2, 10), seed=5)
  mask = np.ones_like(tokens, bool)
  mask[0, 6:] = False
  padded = tokens.copy()
  padded[0, 6:] = 0
  out = np.asarray(m(padded, attention_mask=mask))
  alone = np.asarray(m(tokens[:1, :6]))
  np.testing.assert_allclose(out[0, :6], alone[0], atol=1e-4)
  np.testing.assert_allclose(out[1], np.asarray(m(tokens[1:]))[0], atol=1e-4)
  np.testing.assert_allclose(out[:, :6], hf_logits(hf, padded, mask)[:, :6], atol=1e-4)


@pytest.mark.slow
def test_converted_orbax_round_trip(tmp_path):
  hf = build_hf_model("llama")
  m = models.from_pretrained(save_hf(hf, tmp_path / "hf"))
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-m", "experiments.convert_checkpoint",
                      f"--model={tmp_path / 'hf'}", f"--out={tmp_path / 'conv'}"], cwd=root,
                     capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  bad = subprocess.run([sys.executable, "-m", "experiments.convert_checkpoint",
                        f"--model={tmp_path / 'nope'}", f"--out={tmp_path / 'conv2'}"], cwd=root,
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode != 0 and "not a directory" in bad.stderr and "Traceback" not in bad.stderr
  m2 = models.from_pretrained(tmp_path / "conv")
  assert m2.cfg == m.cfg
  tokens = random_tokens((2, 8))
  np.testing.assert_array_equal(np.asarray(m(tokens)), np.asarray(m2(tokens)))
  bf = models.from_pretrained(tmp_path / "conv", dtype=jnp.bfloat16)
  assert jax.tree.leaves(bf.params)[0].dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf(tokens)) - np.asarray(m(tokens))).max() < 0.1


@requires_shared
def test_tinystories_real_model_matches_hf_and_generates():
  import torch
  import transformers as T
  path = SHARED / "models" / "tinystories-656k"
  m = models.from_pretrained(path)
  assert m.cfg.kv_heads == 4 and m.cfg.n_heads == 8 and m.cfg.tied_embeddings
  hf = T.AutoModelForCausalLM.from_pretrained(str(path)).eval()
  tokens = m.to_tokens(["Once upon a time, there was a little girl named Lily."])
  err = np.abs(np.asarray(m(tokens)) - hf_logits(hf, tokens)).max()
  print(f"tinystories max |logit error| = {err:.2e}")
  assert err < 1e-4
  ours = m.generate(tokens, 20)
  ref = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():  # greedy, without HF's stopping at EOS
    for _ in range(20):
      ref = torch.cat([ref, hf(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
  ref = ref.numpy()
  np.testing.assert_array_equal(ours, ref)
  text = m.tokenizer.decode(ours[0].tolist())
  assert len(text) > 20


# ------------------------------------------------------------------------------- bad checkpoints


def _tiny_gpt2_dir(tmp_path):
  return save_hf(build_hf_model("gpt2"), tmp_path)


def _rewrite(path, fn):
  from safetensors.numpy import load_file, save_file
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  fn(tensors)
  save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  _rewrite(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
  with pytest.raises(models.CheckpointError, match=r"missing tensors: h\.1\.mlp\.c_fc\.weight"):
    models.from_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  _rewrite(d, lambda t: t.__setitem__("transformer.h.0.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(models.CheckpointError, match=r"unexpected tensors: transformer\.h\.0\.extra"):
    models.from_pretrained(d)


def test_wrong_shape_is_named(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  _rewrite(d, lambda t: t.__setitem__("transformer.wpe.weight", np.zeros((10, 32), np.float32)))
  with pytest.raises(models.CheckpointError, match=r"wpe\.weight.*expected \(64, 32\).*got \(10, "
                                                   r"32\)"):
    models.from_pretrained(d)


def test_wrong_dtype_is_named(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  _rewrite(d, lambda t: t.__setitem__("transformer.ln_f.bias", np.zeros(32, np.int64)))
  with pytest.raises(models.CheckpointError, match=r"ln_f\.bias.*dtype int"):
    models.from_pretrained(d)


def test_config_disagreeing_with_tensors(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["n_embd"] = 48
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(models.CheckpointError, match="shape mismatch"):
    models.from_pretrained(d)


def test_unknown_model_type(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["model_type"] = "mamba"
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(models.CheckpointError, match="unknown model_type 'mamba'"):
    models.from_pretrained(d)


def test_truncated_safetensors(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  f = os.path.join(d, "model.safetensors")
  data = open(f, "rb").read()
  open(f, "wb").write(data[: len(data) // 2])
  with pytest.raises(models.CheckpointError, match="cannot read safetensors file "
                                                   ".*model.safetensors"):
    models.from_pretrained(d)


def test_missing_weights_and_config(tmp_path):
  d = _tiny_gpt2_dir(tmp_path)
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="no weights"):
    models.from_pretrained(d)
  shutil.rmtree(d)
  os.makedirs(d)
  with pytest.raises(models.CheckpointError, match="config.json not found"):
    models.from_pretrained(d)
  with pytest.raises(models.CheckpointError, match="not a directory"):
    models.from_pretrained(os.path.join(d, "nope"))


def test_malicious_pickle_is_refused(tmp_path):
  """A .bin whose pickle runs code is refused by torch.load(weights_only=True); the code never runs.
  """
  import pickle
  d = _tiny_gpt2_dir(tmp_path)
  os.remove(os.path.join(d, "model.safetensors"))
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
    pickle.dump({"x": Evil()}, f)
  with pytest.raises(models.CheckpointError, match="weights_only=True"):
    models.from_pretrained(d)
  assert not marker.exists()


def test_bf16_checkpoint_loads_as_bf16_or_upcast(tmp_path):
  """A bf16 checkpoint keeps bf16 params with dtype=None (the binaries' default, no f32 copy on
  the way) and is upcast exactly with dtype=float32, which then matches HF's upcast model."""
  import torch
  import transformers as T
  save_hf(build_hf_model("llama", seed=3), tmp_path / "f32")
  hf = T.LlamaForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.bfloat16).eval()
  save_hf(hf, tmp_path / "bf16")
  m = models.from_pretrained(tmp_path / "bf16", dtype=None)
  assert {x.dtype for x in jax.tree.leaves(m.params)} == {jnp.dtype(jnp.bfloat16)}
  binary = inputs.load_model(str(tmp_path / "bf16"))  # --dtype unset: the checkpoint's own
  assert {x.dtype for x in jax.tree.leaves(binary.params)} == {jnp.dtype(jnp.bfloat16)}
  up = models.from_pretrained(tmp_path / "bf16", dtype=jnp.float32)
  assert inputs.model_hash(up) == inputs.model_hash(inputs.load_model(str(tmp_path / "bf16"),
                                                                      "float32"))
  assert {x.dtype for x in jax.tree.leaves(up.params)} == {jnp.dtype(jnp.float32)}
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(up.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))  # exact upcast
  tokens = random_tokens((2, 9), seed=6)
  ref = hf_logits(hf.float(), tokens)
  assert np.abs(np.asarray(up(tokens)) - ref).max() < 1e-4
  assert np.abs(np.asarray(m(tokens), np.float32) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_load_equals_unsharded_bitwise(dtype, tmp_path):
  """Shard by shard, tensor by tensor (`read_hf_tensors` is lazy), the params equal the single-file
  load bit for bit, in the checkpoint's dtype."""
  import torch
  hf = build_hf_model("gpt2", seed=4).to(getattr(torch, dtype))
  save_hf(hf, tmp_path / "one")
  save_hf(hf, tmp_path / "sharded", max_shard_size="20KB")
  index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 2
  tensors = models.pretrained.read_hf_tensors(str(tmp_path / "sharded"))
  assert not isinstance(tensors, dict)  # nothing read up front
  a = models.from_pretrained(tmp_path / "one", dtype=None)
  b = models.from_pretrained(tmp_path / "sharded", dtype=None)
  la, lb = jax.tree_util.tree_flatten_with_path(a.params)[0], jax.tree.leaves(b.params)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype == jnp.dtype(dtype), path
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def test_tokenizer_from_a_file_or_directory(tmp_path):
  """`load_tokenizer` takes a tokenizer.json file or a directory holding one (None without)."""
  from tokenizers import Tokenizer
  from tokenizers import models as tok_models
  Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
      str(tmp_path / "tokenizer.json"))
  for where in (tmp_path, tmp_path / "tokenizer.json"):
    assert models.pretrained.load_tokenizer(str(where)).token_to_id("a") == 0
  os.makedirs(tmp_path / "empty")
  assert models.pretrained.load_tokenizer(str(tmp_path / "empty")) is None
