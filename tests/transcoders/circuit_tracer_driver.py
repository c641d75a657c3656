"""Runs circuit-tracer's own functions on the inputs the tests write, for tests/transcoders.

Run by `test_circuit_tracer.py` as `$JAXINTERP_CIRCUIT_TRACER_PYTHON circuit_tracer_driver.py DIR`
in the virtual environment where circuit-tracer is installed (it is not a jaxinterp dependency).
DIR holds `inputs.npz` (graphs, logits and activations) and transcoders we wrote; the driver writes
circuit-tracer's results to `DIR/ct/`: `outputs.npz`, each graph's JSON and transcoders written by
circuit-tracer itself. It only calls circuit-tracer's public functions.
"""

import json
import os
import sys

import numpy as np
import torch
import yaml
from circuit_tracer.attribution.targets import AttributionTargets, LogitTarget
from circuit_tracer.graph import (
  Graph,
  compute_graph_scores,
  compute_partial_influences,
  prune_graph,
)
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.utils.create_graph_files import create_graph_files
from circuit_tracer.utils.hf_utils import load_transcoders
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

torch.set_num_threads(1)
CPU = torch.device("cpu")


def tokenizer(directory, vocab_size):
  vocab = {f"t{i}": i for i in range(vocab_size)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok)
  fast.save_pretrained(directory)
  return fast


def graphs(z, out, res, tokdir):
  for name in json.loads(str(z["graph_names"])):
    g = {k[len(name) + 1:]: z[k] for k in z.files if k.startswith(name + "/")}
    n_layers = int(g["n_layers"])
    cfg = UnifiedConfig(n_layers=n_layers, d_model=8, d_head=4, n_heads=2, d_mlp=16,
                        d_vocab=int(g["vocab_size"]), tokenizer_name=tokdir, model_name="test",
                        original_architecture="GPT2LMHeadModel")
    logit_tokens = g["logit_tokens"].tolist()
    graph = Graph(input_string=str(g["prompt"]), input_tokens=torch.tensor(g["input_tokens"]),
                  active_features=torch.tensor(g["active_features"]),
                  adjacency_matrix=torch.tensor(g["adjacency"]), cfg=cfg,
                  selected_features=torch.tensor(g["selected_features"]),
                  activation_values=torch.tensor(g["activation_values"]),
                  logit_targets=[LogitTarget(f"t{t}", t) for t in logit_tokens],
                  logit_probabilities=torch.tensor(g["logit_probabilities"]), scan="test-scan")
    nt, et = (float(v) for v in g["thresholds"])
    pr = prune_graph(graph, nt, et)
    res[name + "/node_mask"] = pr.node_mask.numpy()
    res[name + "/edge_mask"] = pr.edge_mask.numpy()
    res[name + "/cumulative_scores"] = pr.cumulative_scores.numpy()
    res[name + "/scores"] = np.array(compute_graph_scores(graph))
    rows = torch.tensor(g["partial_rows"])
    res[name + "/partial"] = compute_partial_influences(
        graph.adjacency_matrix[rows], graph.logit_probabilities, rows, device=CPU).numpy()
    create_graph_files(graph, slug=name, output_path=out, node_threshold=nt, edge_threshold=et)


def targets(z, res, tok):
  for i in range(int(z["n_target_cases"])):
    logits, unembed = torch.tensor(z[f"targets{i}/logits"]), torch.tensor(z[f"targets{i}/unembed"])
    n, p = (float(v) for v in z[f"targets{i}/settings"])
    t = AttributionTargets(None, logits, unembed, tok, max_n_logits=int(n), desired_logit_prob=p)
    res[f"targets{i}/ids"] = t.token_ids.numpy()
    res[f"targets{i}/probs"] = t.logit_probabilities.numpy()
    res[f"targets{i}/vecs"] = t.logit_vectors.numpy()


def run_plt(tset, x, res, name):
  with torch.no_grad():
    xt = torch.tensor(x)
    res[name + "/encode"] = np.stack([t.encode(xt[i]).numpy() for i, t in enumerate(tset)])
    res[name + "/forward"] = np.stack([t(xt[i]).numpy() for i, t in enumerate(tset)])


def run_clt(clt, x, res, name):
  with torch.no_grad():
    xt = torch.tensor(x)
    f = clt.encode(xt)
    res[name + "/encode"] = f.numpy()
    res[name + "/decode"] = clt.decode(f.to_sparse(), xt).numpy()


def transcoders(z, base, out, res):
  x = z["x"]
  for name in json.loads(str(z["plt_names"])):
    conf_path = os.path.join(base, name, "config.yaml")
    with open(conf_path) as fh:
      conf = yaml.safe_load(fh)
    paths = {i: os.path.join(base, name, p) for i, p in enumerate(conf["transcoders"])}
    tset = load_transcoder_set(paths, scan="s", feature_input_hook=conf["feature_input_hook"],
                               feature_output_hook=conf["feature_output_hook"], device=CPU,
                               dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    run_plt(tset, x, res, name)
    cwd = os.getcwd()  # load_transcoders reads the config's paths from the working directory
    os.chdir(os.path.join(base, name))
    try:
      tset2 = load_transcoders({**conf, "scan": "s"}, device=CPU, dtype=torch.float32,
                               lazy_decoder=False)
    finally:
      os.chdir(cwd)
    run_plt(tset2, x, res, name + "_via_config")
  gs = {i: os.path.join(base, "gemma_scope", f"layer_{i}.npz") for i in range(x.shape[0])}
  tset = load_transcoder_set(gs, scan="s", feature_input_hook="ln2.hook_normalized",
                             feature_output_hook="hook_mlp_out", device=CPU, dtype=torch.float32,
                             special_load_fn="gemma-scope", lazy_encoder=False, lazy_decoder=False)
  run_plt(tset, x, res, "gemma_scope")
  for name in json.loads(str(z["clt_names"])):
    clt = load_clt(os.path.join(base, name), device=CPU, dtype=torch.float32, lazy_decoder=False)
    run_clt(clt, x, res, name)
  # Transcoders written by circuit-tracer: a JumpReLU PLT set with a skip connection, a CLT.
  torch.manual_seed(0)
  L, pos, d = x.shape
  F = int(z["F"])
  tset = load_transcoder_set({i: os.path.join(base, "plt_relu", f"layer_{i}.safetensors")
                              for i in range(L)}, scan="s", feature_input_hook="mlp.hook_in",
                             feature_output_hook="hook_mlp_out", device=CPU, dtype=torch.float32,
                             lazy_encoder=False, lazy_decoder=False)
  with torch.no_grad():
    for t in tset:
      for p in (t.W_enc, t.W_dec, t.b_enc, t.b_dec):
        p.copy_(torch.randn_like(p) * 0.5)
      t.W_skip = torch.nn.Parameter(torch.randn(d, d) * 0.3)
      t.activation_function = JumpReLU(torch.rand(F) * 0.5, 0.1)
  tset.to_safetensors(os.path.join(out, "ct_plt"))
  run_plt(tset, x, res, "ct_plt")
  for act in ("relu", "jump_relu"):
    clt = CrossLayerTranscoder(L, F, d, activation_function=act, lazy_decoder=False, device=CPU,
                               dtype=torch.float32)
    with torch.no_grad():
      for p in clt.parameters():
        p.copy_(torch.randn_like(p) * 0.5 if act == "relu" or p.ndim != 3 or p.shape[1] != 1
                else torch.rand_like(p) * 0.5)
    clt.to_safetensors(os.path.join(out, f"ct_clt_{act}"))
    run_clt(clt, x, res, f"ct_clt_{act}")


def main():
  base = sys.argv[1]
  out = os.path.join(base, "ct")
  os.makedirs(out, exist_ok=True)
  z = np.load(os.path.join(base, "inputs.npz"))
  tokdir = os.path.join(base, "tokenizer")
  tok = tokenizer(tokdir, int(z["vocab_size"]))
  res = {}
  graphs(z, out, res, tokdir)
  targets(z, res, tok)
  transcoders(z, base, out, res)
  np.savez(os.path.join(out, "outputs.npz"), **res)


if __name__ == "__main__":
  main()
