"""The attribution-graph run behind `experiments/attribution_graph.py`: load the model and its
transcoders, tokenise the prompt as circuit-tracer does (BOS prepended), `attribute_graph`, and
write `graph.npz` (the dense graph), `graph.json` (the pruned graph in circuit-tracer's frontend
schema, with `graph-metadata.json` beside it), `graph.html` (its offline viewer,
`viz.graph_viewer`) and `DONE`.

Several processes (`--num_processes`, see `runtime.distributed`) split the rows' batches
(`attribute_graph`) and all end with the same graph; process 0 alone creates, locks and writes the
output directory and prints the report (the others only check the directory).

Every check of the input runs before the output directory is created, so bad input (an empty
prompt, a prompt longer than the context, transcoders for another model, a threshold outside
(0, 1], ...) is one line and leaves no directory behind.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np

from jaxinterp.models.pretrained import Model
from jaxinterp.runtime import files, inputs, timing
from jaxinterp.transcoders import frontend, graph, loading, pruning, toy
from jaxinterp.transcoders.attribution import attribute_graph
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.viz import graph_viewer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OUTPUTS = ("graph.npz", "graph.json", "graph-metadata.json", "graph.html")


@dataclasses.dataclass(frozen=True)
class AttributionGraphConfig:
  """One attribution-graph run (each field is the binary's flag of the same name).

  Attributes:
    model: HF checkpoint directory, orbax conversion, "toy_mlp" (the bundled induction model with
      MLPs, `transcoders.toy`) or "toy" (the attention-only bundled model).
    transcoders: circuit-tracer's `config.yaml` (or its directory); "" is the bundled toy_mlp's
      transcoders (with --model=toy_mlp).
    prompt: the text (a model without a tokenizer, as the toy: token ids separated by spaces).
    max_n_logits, desired_logit_prob: the logit targets (`targets.salient_logits`).
    max_feature_nodes: keep at most this many features (None: every active feature).
    node_threshold, edge_threshold: graph.json's pruning (`pruning.prune`).
    batch_size: rows per VJP batch. dtype: "float32" or "bfloat16" (model and transcoders).
  """

  model: str = toy.TOY_MLP
  transcoders: str = ""
  prompt: str = "5 3 17 42 8 25 61 9 3 17 42"  # toy_mlp predicts 8, by induction
  max_n_logits: int = 10
  desired_logit_prob: float = 0.95
  max_feature_nodes: int | None = None
  node_threshold: float = 0.8
  edge_threshold: float = 0.98
  batch_size: int = 128
  dtype: str = "float32"


def _check(config: AttributionGraphConfig) -> None:
  pruning.check_threshold("--node_threshold", config.node_threshold)
  pruning.check_threshold("--edge_threshold", config.edge_threshold)
  if not 0.0 < config.desired_logit_prob <= 1.0:
    raise TranscoderError(f"--desired_logit_prob must be in (0, 1], got "
                          f"{config.desired_logit_prob}")
  inputs.positive("max_n_logits", config.max_n_logits)
  inputs.positive("batch_size", config.batch_size)
  if config.max_feature_nodes is not None:
    inputs.positive("max_feature_nodes", config.max_feature_nodes, minimum=0)
  if config.dtype not in DTYPES:
    raise TranscoderError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
  if not config.prompt.strip():
    raise TranscoderError("--prompt is empty")


def tokenize(model: Model, prompt: str) -> tuple[np.ndarray, list[str]]:
  """The prompt's token ids with BOS first (circuit-tracer's `ensure_tokenized`), and each token's
  text. Without a tokenizer the prompt is token ids separated by spaces."""
  bos = inputs.bos_id(model)
  if model.tokenizer is None:
    try:
      ids = [int(t) for t in prompt.split()]
    except ValueError:
      raise TranscoderError("this model has no tokenizer: give --prompt as token ids separated "
                            f"by spaces (0 to {model.cfg.d_vocab - 1})") from None
    texts = [str(i) for i in ids]
  else:
    enc = model.tokenizer.encode(prompt, add_special_tokens=False)
    ids, texts = list(enc.ids), list(enc.tokens)
  if not ids:
    raise TranscoderError(f"--prompt {prompt!r} has no tokens")
  if ids[0] != bos:
    ids, texts = [bos] + ids, ["<bos>"] + texts
  toks = np.asarray(ids, np.int64)
  if len(toks) > model.cfg.n_ctx:
    raise TranscoderError(f"--prompt has {len(toks)} tokens with BOS, more than the model's "
                          f"context of {model.cfg.n_ctx}")
  bad = toks[(toks < 0) | (toks >= model.cfg.d_vocab)]
  if bad.size:
    raise TranscoderError(f"--prompt: token ids outside the vocabulary [0, {model.cfg.d_vocab}): "
                          f"{bad.tolist()}")
  return toks, texts


def _is_toy_mlp(model: Model) -> bool:
  return bool(model.path) and os.path.realpath(model.path) == os.path.realpath(toy.TOY_MLP_DIR)


def _label(model: Model, token: int) -> str:
  if model.tokenizer is None or token >= model.cfg.d_vocab:
    return str(token)
  return model.tokenizer.decode([token])


class _Bar:
  """A one-line progress bar on stderr."""

  def __init__(self, label: str, width: int = 30):
    self.label, self.width = label, width

  def __call__(self, done: int, total: int) -> None:
    n = self.width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{self.label} [{'#' * n}{' ' * (self.width - n)}] {done}/{total} rows", end=end,
          file=sys.stderr, flush=True)


def _write(config: AttributionGraphConfig, model: Model, tc: loading.Transcoders, path: str,
           texts: list[str], g: graph.AttributionGraph, pruned: pruning.PruneResult,
           out: str) -> None:
  """graph.npz, graph.json (with graph-metadata.json) and graph.html of `g` in `out`; `pruned` is
  `g` pruned with the config's thresholds."""
  files.atomic_with(os.path.join(out, "graph.npz"), lambda p: graph.save_npz(g, p),
                    suffix=".npz")
  frontend.write_graph_files(
      g, out, slug="graph", scan=tc.scan or os.path.basename(os.path.dirname(
          os.path.abspath(loading.read_config(path)["_path"]))),
      prompt=config.prompt, prompt_tokens=texts,
      logit_labels=[_label(model, int(t)) for t in g.logit_tokens],
      node_threshold=config.node_threshold, edge_threshold=config.edge_threshold, pruned=pruned)
  graph_viewer.write_html(os.path.join(out, "graph.json"), os.path.join(out, "graph.html"),
                          title=f"Attribution graph: {config.prompt}")


def attribution_graph(config: AttributionGraphConfig, out: str) -> dict:
  """Run `config` and write its outputs to `out`; returns a summary dict (nodes, features,
  scores, phase seconds)."""
  phases = timing.Phases(("load", "attribute", "write"))
  with phases:
    phases.start("load")
    _check(config)
    dtype = DTYPES[config.dtype]
    model_dir = toy.TOY_MLP_DIR if config.model == toy.TOY_MLP else config.model
    model = inputs.load_model(model_dir, dtype)
    path = config.transcoders or toy.TOY_TRANSCODERS_DIR
    if not config.transcoders and not _is_toy_mlp(model):
      raise TranscoderError("--transcoders is needed with a --model other than the bundled "
                            "toy_mlp")
    tc = loading.load(path, model.cfg, dtype)
    tokens, texts = tokenize(model, config.prompt)
    with files.RunDir(out) as run_dir:
      phases.start("attribute")
      g = attribute_graph(model.cfg, model.params, tc, tokens,
                          max_n_logits=config.max_n_logits,
                          desired_logit_prob=config.desired_logit_prob,
                          max_feature_nodes=config.max_feature_nodes,
                          batch_size=config.batch_size,
                          progress=_Bar("attribute") if files.is_writer() else None)
      phases.start("write")
      pruned = pruning.prune(g, config.node_threshold, config.edge_threshold)
      with run_dir.writing(OUTPUTS):
        if files.is_writer():  # several processes: process 0 writes
          _write(config, model, tc, path, texts, g, pruned, out)
      phases.stop()
  replacement_score, completeness = pruned.replacement_score, pruned.completeness_score
  summary = {"nodes": g.n_nodes, "features": g.n_features,
             "active_features": len(g.active_features), "logits": g.n_logits,
             "replacement_score": replacement_score, "completeness_score": completeness,
             "phase_seconds": phases.seconds()}
  print(f"{g.n_nodes} nodes ({g.n_features} features, {g.n_logits} logits); replacement score "
        f"{replacement_score:.3f}, completeness {completeness:.3f}; wrote {out}")
  print("phases: " + phases.line())
  return summary
