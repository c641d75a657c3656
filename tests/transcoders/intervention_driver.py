"""Runs circuit-tracer's `feature_intervention` and `feature_intervention_generate` (0.5.0,
TransformerLens backend) on small random models, for `test_feature_interventions.py`.

Run as `$JAXINTERP_CIRCUIT_TRACER_PYTHON intervention_driver.py DIR` in the virtual environment
where circuit-tracer is installed. DIR holds `cases.json`: the models to build (as
`attribution_driver.py` builds and saves them, to `DIR/models/NAME`), and for each case its model,
transcoders written by us (`kind` "plt": a transcoder set's directory, "clt": a cross-layer
transcoder's), prompt, interventions and options. An intervention's position is an int, a list of
ints or `{"slice": [start, stop]}`; its feature an int or a list; its value a float or a list. The
driver writes each case's logits, activations and (for generation) tokens to `DIR/ct/out.npz`. It
only calls circuit-tracer's and TransformerLens's public functions.
"""

import json
import os
import sys

import numpy as np
import torch
from attribution_driver import CPU, build, replacement_model, tl_config, tokenizer
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
  TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

torch.set_num_threads(1)


def clt_model(spec, hf, directory, hooks, tok, tokdir):
  """A TransformerLens replacement model over a cross-layer transcoder (GPT-2 models only)."""
  clt = load_clt(directory, feature_input_hook=hooks[0], feature_output_hook=hooks[1], scan="test",
                 device=CPU, dtype=torch.float32, lazy_decoder=False)
  cfg = tl_config(spec, tokdir)
  model = TransformerLensReplacementModel.from_config(cfg, clt, tokenizer=tok)
  sd = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v
        for k, v in convert_gpt2_weights(hf, cfg).items()}
  model.load_state_dict(sd, strict=False)
  model.eval()
  return model


def position(p):
  return slice(*p["slice"]) if isinstance(p, dict) else (torch.tensor(p) if isinstance(p, list)
                                                         else p)


def interventions(spec):
  return [(layer, position(p), torch.tensor(f) if isinstance(f, list) else f,
           torch.tensor(v, dtype=torch.float32) if isinstance(v, list) else v)
          for layer, p, f, v in spec]


def main():
  base = sys.argv[1]
  with open(os.path.join(base, "cases.json")) as fh:
    spec = json.load(fh)
  out = os.path.join(base, "ct")
  os.makedirs(out, exist_ok=True)
  hfs, toks, res = {}, {}, {}
  for name, m in spec["models"].items():
    tokdir = os.path.join(base, "tokenizers", name)
    toks[name] = (tokenizer(tokdir, m["vocab"]), tokdir)
    hfs[name] = build(m, os.path.join(base, "models", name))
  models = {}
  for case_name, case in spec["cases"].items():
    m = spec["models"][case["model"]]
    tok, tokdir = toks[case["model"]]
    key = (case["model"], case["transcoders"])
    if key not in models:
      path = os.path.join(base, case["transcoders"])
      models[key] = (clt_model(m, hfs[case["model"]], path, case["hooks"], tok, tokdir)
                     if case["kind"] == "clt"
                     else replacement_model(m, hfs[case["model"]], path, tok, tokdir))
    model = models[key]
    ivs = interventions(case["interventions"])
    kw = dict(freeze_attention=case["freeze_attention"],
              apply_activation_function=case["apply_activation_function"],
              constrained_layers=(range(*case["constrained"]) if case["constrained"] else None))
    if case.get("max_new_tokens"):
      prompt = " ".join(f"t{t}" for t in case["prompt"])
      gen, logits, acts = model.feature_intervention_generate(
          prompt, ivs, max_new_tokens=case["max_new_tokens"], do_sample=False,
          stop_at_eos=False, verbose=False, return_type="tokens", **kw)
      res[case_name + "/tokens"] = gen.reshape(-1).numpy()
      assert res[case_name + "/tokens"][:len(case["prompt"])].tolist() == case["prompt"], gen
    else:
      logits, acts = model.feature_intervention(torch.tensor(case["prompt"]), ivs, **kw)
      logits = logits[0]
    res[case_name + "/logits"] = logits.numpy()
    res[case_name + "/activations"] = acts.numpy()
  np.savez(os.path.join(out, "out.npz"), **res)


if __name__ == "__main__":
  main()
