"""Builds small random HuggingFace models and runs circuit-tracer's `attribute` on them, for
`test_attribution_circuit_tracer.py`.

Run as `$JAXINTERP_CIRCUIT_TRACER_PYTHON attribution_driver.py DIR` in the virtual environment where
circuit-tracer is installed. DIR holds `cases.json` (the models to build, and for each case its
model, transcoder set written by us, prompt tokens and settings). The driver saves every model with
`save_pretrained` to `DIR/models/NAME` (the test loads the same files), loads it into
circuit-tracer's TransformerLens backend (`TransformerLensReplacementModel.from_config` with
TransformerLens's weight conversion, `.mlp.` renamed `.mlp.old_mlp.` and `unembed.`
`unembed.old_unembed.`), and writes each case's graph to `DIR/ct/graphs.npz`. It only calls
circuit-tracer's and TransformerLens's public functions.
"""

import json
import os
import sys

import numpy as np
import torch
import yaml
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
  TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
  convert_gpt2_weights,
  convert_llama_weights,
)
from transformers import (
  GPT2Config,
  GPT2LMHeadModel,
  LlamaConfig,
  LlamaForCausalLM,
  PreTrainedTokenizerFast,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")


def tokenizer(directory, vocab_size):
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", unk_token="t1")
  fast.save_pretrained(directory)
  return PreTrainedTokenizerFast.from_pretrained(directory)


def build(spec, directory):
  """A random HF model with weights scaled up (so attention and the norms are far from trivial)."""
  torch.manual_seed(spec["seed"])
  d, L, H, V = spec["d_model"], spec["n_layers"], spec["n_heads"], spec["vocab"]
  if spec["kind"] == "gpt2":
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=spec["n_ctx"], n_embd=d, n_layer=L,
                                    n_head=H, activation_function="gelu_new"))
  else:
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=d, intermediate_size=spec["d_mlp"], num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=spec["n_kv_heads"],
        max_position_embeddings=spec["n_ctx"], rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=0, eos_token_id=1))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(spec["scale"] * torch.randn_like(p))
  hf.eval()
  hf.save_pretrained(directory, safe_serialization=True)
  return hf


def tl_config(spec, tokdir):
  d, H = spec["d_model"], spec["n_heads"]
  common = dict(n_layers=spec["n_layers"], d_model=d, n_ctx=spec["n_ctx"], d_head=d // H,
                n_heads=H, d_vocab=spec["vocab"], tokenizer_name=tokdir, device="cpu",
                dtype=torch.float32, default_prepend_bos=False, eps=1e-5)
  if spec["kind"] == "gpt2":
    return HookedTransformerConfig(**common, d_mlp=4 * d, act_fn="gelu_new",
                                   normalization_type="LN", use_attn_scale=True,
                                   original_architecture="GPT2LMHeadModel")
  return HookedTransformerConfig(
      **common, d_mlp=spec["d_mlp"], act_fn="silu", normalization_type="RMS",
      positional_embedding_type="rotary", rotary_dim=d // H, rotary_adjacent_pairs=False,
      final_rms=True, gated_mlp=True, n_key_value_heads=spec["n_kv_heads"],
      original_architecture="LlamaForCausalLM")


def replacement_model(spec, hf, transcoder_dir, tok, tokdir):
  with open(os.path.join(transcoder_dir, "config.yaml")) as fh:
    conf = yaml.safe_load(fh)
  paths = {i: os.path.join(transcoder_dir, p) for i, p in enumerate(conf["transcoders"])}
  tset = load_transcoder_set(paths, scan="test", feature_input_hook=conf["feature_input_hook"],
                             feature_output_hook=conf["feature_output_hook"], device=CPU,
                             dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
  cfg = tl_config(spec, tokdir)
  model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tok)
  convert = convert_gpt2_weights if spec["kind"] == "gpt2" else convert_llama_weights
  sd = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v
        for k, v in convert(hf, cfg).items()}
  sd.setdefault("unembed.old_unembed.b_U", torch.zeros(cfg.d_vocab))  # no unembedding bias
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))
             and "transcoders" not in k]
  assert not missing, missing
  model.eval()
  return model


def main():
  base = sys.argv[1]
  with open(os.path.join(base, "cases.json")) as fh:
    spec = json.load(fh)
  out = os.path.join(base, "ct")
  os.makedirs(out, exist_ok=True)
  res = {}
  hfs, toks = {}, {}
  for name, m in spec["models"].items():
    tokdir = os.path.join(base, "tokenizers", name)
    toks[name] = (tokenizer(tokdir, m["vocab"]), tokdir)
    hfs[name] = build(m, os.path.join(base, "models", name))
  for case_name, case in spec["cases"].items():
    m = spec["models"][case["model"]]
    tok, tokdir = toks[case["model"]]
    model = replacement_model(m, hfs[case["model"]], os.path.join(base, case["transcoders"]),
                              tok, tokdir)
    for i, prompt in enumerate(case["prompts"]):
      g = attribute(torch.tensor(prompt), model, max_n_logits=case["max_n_logits"],
                    desired_logit_prob=case["desired_logit_prob"], batch_size=case["batch_size"],
                    max_feature_nodes=case.get("max_feature_nodes"))
      key = f"{case_name}/{i}"
      res[key + "/adjacency"] = g.adjacency_matrix.numpy()
      res[key + "/active_features"] = g.active_features.numpy()
      res[key + "/selected_features"] = g.selected_features.numpy()
      res[key + "/activation_values"] = g.activation_values.numpy()
      res[key + "/input_tokens"] = g.input_tokens.numpy()
      res[key + "/logit_tokens"] = np.array([t.vocab_idx for t in g.logit_targets])
      res[key + "/logit_probabilities"] = g.logit_probabilities.numpy()
  np.savez(os.path.join(out, "graphs.npz"), **res)


if __name__ == "__main__":
  main()
