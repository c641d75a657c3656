"""Builds small random HuggingFace models and runs circuit-tracer's `attribute` on them, for
`test_attribution_circuit_tracer.py` and `test_attribution_circuit_tracer_more.py`.

Run as `$JAXINTERP_CIRCUIT_TRACER_PYTHON attribution_driver.py DIR` in the virtual environment where
circuit-tracer is installed. DIR holds `cases.json` (the models to build, and for each case its
model, transcoder set written by us, prompt tokens and settings). The driver saves every model with
`save_pretrained` to `DIR/models/NAME` (the test loads the same files), loads it into
circuit-tracer's TransformerLens backend (`TransformerLensReplacementModel.from_config` with
TransformerLens's weight conversion, `.mlp.` renamed `.mlp.old_mlp.` and `unembed.`
`unembed.old_unembed.`), and writes each case's graph to `DIR/ct/graphs.npz`. Model kinds:
"gpt2", "llama", "gemma2" (Gemma2ForCausalLM with TransformerLens's `convert_gemma_weights`). A
transcoder directory whose config.yaml says `model_kind: cross_layer_transcoder` is loaded with
`load_clt`. Case options: `zero_softcap` (run `attribute` inside the model's `zero_softcap()`),
`graph_json` ([node_threshold, edge_threshold]: also write each graph's `create_graph_files` JSON
to `DIR/ct/CASE_I.json`). It only calls circuit-tracer's and TransformerLens's public functions.
"""

import contextlib
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
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.utils.create_graph_files import create_graph_files
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
  convert_gemma_weights,
  convert_gpt2_weights,
  convert_llama_weights,
)
from transformers import (
  Gemma2Config,
  Gemma2ForCausalLM,
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
  elif spec["kind"] == "gemma2":
    return _build_gemma2(spec, directory)
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


def _build_gemma2(spec, directory):
  """A random Gemma-2: post-norms, (1 + w) RMSNorm, GQA, both soft-caps, a sliding window on
  layers 0, 2, ... (HF's default layer types), embeddings scaled by sqrt(d_model), tied unembedding,
  `query_pre_attn_scalar` other than d_head."""
  d, L, H, V = spec["d_model"], spec["n_layers"], spec["n_heads"], spec["vocab"]
  hf = Gemma2ForCausalLM(Gemma2Config(
      vocab_size=V, hidden_size=d, intermediate_size=spec["d_mlp"], num_hidden_layers=L,
      num_attention_heads=H, num_key_value_heads=spec["n_kv_heads"], head_dim=d // H,
      max_position_embeddings=spec["n_ctx"], rms_norm_eps=1e-6, rope_theta=10000.0,
      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=spec["query_pre_attn_scalar"],
      sliding_window=spec["sliding_window"], attn_logit_softcapping=spec["attn_softcap"],
      final_logit_softcapping=spec["final_softcap"], bos_token_id=0, eos_token_id=1,
      pad_token_id=2, attn_implementation="eager"))
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim == 1:  # the norms' w of (1 + w): scales about 1
        p.copy_(0.3 * torch.randn_like(p))
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
  if spec["kind"] == "gemma2":
    L = spec["n_layers"]
    return HookedTransformerConfig(**{
        **common, "eps": 1e-6, "d_mlp": spec["d_mlp"], "act_fn": "gelu_pytorch_tanh",
        "normalization_type": "RMS", "positional_embedding_type": "rotary",
        "rotary_dim": d // H, "rotary_base": 10000.0, "rotary_adjacent_pairs": False,
        "final_rms": True, "gated_mlp": True, "n_key_value_heads": spec["n_kv_heads"],
        "use_attn_scale": True, "attn_scale": spec["query_pre_attn_scalar"] ** 0.5,
        "use_local_attn": True, "window_size": spec["sliding_window"],
        "attn_types": ["local" if i % 2 == 0 else "global" for i in range(L)],
        "attn_scores_soft_cap": spec["attn_softcap"],
        "output_logits_soft_cap": spec["final_softcap"],
        "use_normalization_before_and_after": True,
        "original_architecture": "Gemma2ForCausalLM"})
  return HookedTransformerConfig(
      **common, d_mlp=spec["d_mlp"], act_fn="silu", normalization_type="RMS",
      positional_embedding_type="rotary", rotary_dim=d // H, rotary_adjacent_pairs=False,
      final_rms=True, gated_mlp=True, n_key_value_heads=spec["n_kv_heads"],
      original_architecture="LlamaForCausalLM")


CONVERT = {"gpt2": convert_gpt2_weights, "llama": convert_llama_weights,
           "gemma2": convert_gemma_weights}


def replacement_model(spec, hf, transcoder_dir, tok, tokdir):
  with open(os.path.join(transcoder_dir, "config.yaml")) as fh:
    conf = yaml.safe_load(fh)
  if conf.get("model_kind") == "cross_layer_transcoder":
    tset = load_clt(transcoder_dir, feature_input_hook=conf["feature_input_hook"],
                    feature_output_hook=conf["feature_output_hook"], scan="test", device=CPU,
                    dtype=torch.float32, lazy_decoder=False)
  else:
    paths = {i: os.path.join(transcoder_dir, p) for i, p in enumerate(conf["transcoders"])}
    tset = load_transcoder_set(paths, scan="test", feature_input_hook=conf["feature_input_hook"],
                               feature_output_hook=conf["feature_output_hook"], device=CPU,
                               dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
  cfg = tl_config(spec, tokdir)
  model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tok)
  convert = CONVERT[spec["kind"]]
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
      with model.zero_softcap() if case.get("zero_softcap") else contextlib.nullcontext():
        g = attribute(torch.tensor(prompt), model, max_n_logits=case["max_n_logits"],
                      desired_logit_prob=case["desired_logit_prob"],
                      batch_size=case["batch_size"],
                      max_feature_nodes=case.get("max_feature_nodes"))
      key = f"{case_name}/{i}"
      if case.get("graph_json"):
        nt, et = case["graph_json"]
        create_graph_files(g, slug=f"{case_name}_{i}", output_path=out, node_threshold=nt,
                           edge_threshold=et)
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
