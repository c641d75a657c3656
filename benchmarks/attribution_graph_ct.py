"""circuit-tracer's side of `benchmarks/attribution_graph.py`: one whole process, run with the
Python of circuit-tracer's virtual environment (circuit-tracer 0.5.0, transformers 4.57.3,
TransformerLens), never with jaxinterp's.

    $CT_PYTHON benchmarks/attribution_graph_ct.py tokenizer DIR VOCAB    # setup, not timed
    $CT_PYTHON benchmarks/attribution_graph_ct.py run SPEC.json          # the timed process

`run` imports circuit-tracer, loads the saved HF GPT-2 checkpoint into its TransformerLens backend
(`TransformerLensReplacementModel.from_config` with TransformerLens's GPT-2 weight conversion,
`.mlp.` renamed `.mlp.old_mlp.` and `unembed.` `unembed.old_unembed.`, as circuit-tracer's own
`from_config` path expects) with the transcoder set jaxinterp wrote, runs `attribute`, saves the
dense graph (`Graph.to_pt`) and writes the pruned graph.json (`create_graph_files`): the same work
as `python -m experiments.attribution_graph`. It prints one JSON line of phase times (seconds).
Only the standard library is imported at the top, so the import phase is timed.
"""

import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def tokenizer(directory, vocab):
  """A word-level tokenizer `t0 .. t{vocab-1}` (BOS t0) saved to `directory`."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", unk_token="t1").save_pretrained(
      directory)


def run(spec):
  phases, t = {}, time.perf_counter()

  def phase(name):
    nonlocal t
    now = time.perf_counter()
    phases[name] = round(now - t, 3)
    t = now

  import torch
  import yaml
  from circuit_tracer.attribution.attribute import attribute
  from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel,
  )
  from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
  from circuit_tracer.utils.create_graph_files import create_graph_files
  from transformer_lens import HookedTransformerConfig
  from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
  from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
  phase("import")
  hf = GPT2LMHeadModel.from_pretrained(spec["model"]).eval()
  tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
  tc_dir = os.path.dirname(spec["transcoders"])
  with open(spec["transcoders"]) as fh:
    conf = yaml.safe_load(fh)
  tset = load_transcoder_set(
      {i: os.path.join(tc_dir, p) for i, p in enumerate(conf["transcoders"])}, scan="bench",
      feature_input_hook=conf["feature_input_hook"],
      feature_output_hook=conf["feature_output_hook"], device=torch.device("cpu"),
      dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
  c = hf.config
  cfg = HookedTransformerConfig(
      n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
      n_heads=c.n_head, d_vocab=c.vocab_size, d_mlp=4 * c.n_embd, act_fn="gelu_new",
      normalization_type="LN", tokenizer_name=spec["tokenizer"], device="cpu",
      dtype=torch.float32, default_prepend_bos=False, eps=c.layer_norm_epsilon,
      original_architecture="GPT2LMHeadModel")
  model = TransformerLensReplacementModel.from_config(cfg, tset, tokenizer=tok)
  sd = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v
        for k, v in convert_gpt2_weights(hf, cfg).items()}
  sd.setdefault("unembed.old_unembed.b_U", torch.zeros(cfg.d_vocab))
  model.load_state_dict(sd, strict=False)
  model.eval()
  phase("load")
  graph = attribute(torch.tensor(spec["tokens"]), model, max_n_logits=spec["max_n_logits"],
                    desired_logit_prob=spec["desired_logit_prob"],
                    batch_size=spec["ct_batch_size"])
  phase("attribute")
  os.makedirs(spec["out"], exist_ok=True)
  graph.to_pt(os.path.join(spec["out"], "graph.pt"))
  create_graph_files(graph, "graph", spec["out"], node_threshold=spec["node_threshold"],
                     edge_threshold=spec["edge_threshold"])
  phase("write")
  n_features = int(len(graph.selected_features))
  phases["total"] = round(time.perf_counter() - T_START, 3)
  print(json.dumps({"phases": phases, "n_features": n_features,
                    "n_active": int(len(graph.active_features)),
                    "logit_tokens": [int(x.vocab_idx) for x in graph.logit_targets],
                    "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
  if sys.argv[1] == "tokenizer":
    tokenizer(sys.argv[2], int(sys.argv[3]))
  else:
    with open(sys.argv[2]) as fh:
      run(json.load(fh))
