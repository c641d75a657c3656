"""Transcoders and attribution graphs over their features, as circuit-tracer defines them
(Ameisen et al. 2025, "Circuit Tracing"; decoderesearch/circuit-tracer).

Modules:
- `errors`: `TranscoderError`, the one-line error of bad transcoder input;
- `activations`: ReLU and JumpReLU (with the straight-through estimator) and the stacked encoder;
- `plt`: `PerLayerTranscoders`, one transcoder per layer (optional skip connection);
- `clt`: `CrossLayerTranscoder`, features that write to their layer and every later one;
- `hooks`: circuit-tracer's hook names mapped onto our sites (`sites_for`);
- `safetensors_file`: safetensors reading and writing, refusing truncated files;
- `loading`: circuit-tracer's transcoder sets and CLTs, Gemma Scope's `params.npz`;
- `saving`: writing circuit-tracer's formats;
- `training`: training per-layer transcoders with optax (`train_transcoders`);
- `corpus`, `training_run`: the token rows they train on and the `train_transcoders` binary's run;
- `interventions`: `feature_intervention` and `feature_intervention_generate`, circuit-tracer's
  feature interventions (set features, attention frozen or free) and generation with them;
- `targets`: the logit targets a graph explains (`salient_logits`);
- `graph`: `AttributionGraph`, the dense graph in circuit-tracer's node order, and `graph.npz`;
- `pruning`: influence, `prune` and the replacement and completeness scores;
- `frontend`: `graph.json` in circuit-tracer's frontend schema;
- `replacement`: the local replacement model of a prompt (frozen attention, norms and error terms),
  linearised, and its backward run layer by layer from a batch's top layer down;
- `layer_chunks`: a batch of rows' dot products with one layer's decoder and error vectors;
- `selection`: the prompt's checks, the logit targets and the ranking loop's next features;
- `attribution`: `attribute_graph`, the dense graph of a prompt, as circuit-tracer's `attribute`.
"""

from jaxinterp.transcoders import (
  activations,
  attribution,
  clt,
  errors,
  frontend,
  graph,
  hooks,
  interventions,
  loading,
  plt,
  pruning,
  replacement,
  safetensors_file,
  saving,
  targets,
  training,
)
from jaxinterp.transcoders.attribution import attribute_graph
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.frontend import graph_json, write_graph_files
from jaxinterp.transcoders.graph import AttributionGraph, load_npz, save_npz
from jaxinterp.transcoders.hooks import TranscoderSites, sites_for
from jaxinterp.transcoders.loading import check_model, load, load_clt_files, load_gemma_scope
from jaxinterp.transcoders.plt import PerLayerTranscoders
from jaxinterp.transcoders.pruning import PruneResult, graph_scores, prune
from jaxinterp.transcoders.saving import save_clt, save_transcoder_set
from jaxinterp.transcoders.targets import LogitTargets, salient_logits
from jaxinterp.transcoders.training import TrainOptions, TrainResult, train_transcoders

__all__ = [
  "AttributionGraph", "CrossLayerTranscoder", "LogitTargets", "PerLayerTranscoders", "PruneResult",
  "TrainOptions", "TrainResult", "TranscoderError", "TranscoderSites", "activations",
  "attribute_graph", "attribution", "check_model", "clt", "errors", "frontend", "graph",
  "graph_json", "graph_scores", "hooks", "interventions", "load", "load_clt_files",
  "load_gemma_scope", "load_npz", "loading", "plt", "prune", "pruning", "replacement",
  "safetensors_file", "salient_logits", "save_clt", "save_npz", "save_transcoder_set", "saving",
  "sites_for", "targets", "train_transcoders", "training", "write_graph_files",
]
