"""The attribution graph as data: a dense adjacency over circuit-tracer's node order, and
`graph.npz`.

Nodes are ordered as circuit-tracer's `Graph`:

  [selected features (n_features)] [errors, layer-major: (layer 0, pos 0), (layer 0, pos 1), ...
  (n_layers * n_pos)] [token embeddings (n_pos)] [logit targets (n_logits)]

`adjacency[target, source]` is the direct effect of `source` on `target`. Only feature and logit
rows are non-zero (errors and tokens have no inputs).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxinterp.transcoders.errors import TranscoderError

NPZ_ARRAYS = ("adjacency", "active_features", "selected_features", "activation_values",
              "input_tokens", "logit_tokens", "logit_probabilities")


@dataclasses.dataclass(frozen=True)
class AttributionGraph:
  """A dense, unpruned attribution graph (host arrays).

  Attributes:
    adjacency: Float[ndarray, "N N"] (float32), target row, source column.
    active_features: Int[ndarray, "n_active 3"], (layer, position, feature) of every active feature.
    selected_features: Int[ndarray, "n_features"], indices into `active_features` of the feature
      nodes, in node order.
    activation_values: Float[ndarray, "n_active"], the activation of every active feature.
    input_tokens: Int[ndarray, "n_pos"], the prompt (with BOS).
    logit_tokens: Int[ndarray, "n_logits"], each logit target's vocabulary index (custom targets:
      `vocab_size + i`, circuit-tracer's virtual indices).
    logit_probabilities: Float[ndarray, "n_logits"], each target's probability (its weight).
  """

  adjacency: np.ndarray
  active_features: np.ndarray
  selected_features: np.ndarray
  activation_values: np.ndarray
  input_tokens: np.ndarray
  logit_tokens: np.ndarray
  logit_probabilities: np.ndarray

  @property
  def n_pos(self) -> int:
    return len(self.input_tokens)

  @property
  def n_features(self) -> int:
    return len(self.selected_features)

  @property
  def n_logits(self) -> int:
    return len(self.logit_tokens)

  @property
  def n_nodes(self) -> int:
    return self.adjacency.shape[0]

  @property
  def n_layers(self) -> int:
    """Layers, from the node count: N = n_features + (n_layers + 1) * n_pos + n_logits."""
    return (self.n_nodes - self.n_features - self.n_logits) // max(self.n_pos, 1) - 1

  @property
  def error_start(self) -> int:
    return self.n_features

  @property
  def token_start(self) -> int:
    return self.n_features + self.n_layers * self.n_pos

  @property
  def logit_start(self) -> int:
    return self.token_start + self.n_pos

  def logit_weights(self) -> np.ndarray:
    """Float[ndarray, "N"]: the logit probabilities on the logit nodes, zero elsewhere."""
    w = np.zeros(self.n_nodes, np.float32)
    w[self.logit_start:] = self.logit_probabilities
    return w

  def validate(self, source: str = "graph") -> AttributionGraph:
    """Check the arrays' shapes and the node count (TranscoderError: one line); return self."""
    a = self.adjacency
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
      raise TranscoderError(f"{source}: adjacency has shape {a.shape}, expected square [N, N]")
    if self.active_features.ndim != 2 or self.active_features.shape[1] != 3:
      raise TranscoderError(f"{source}: active_features has shape {self.active_features.shape}, "
                            "expected [n_active, 3]")
    n_active = self.active_features.shape[0]
    if self.activation_values.shape != (n_active,):
      raise TranscoderError(f"{source}: activation_values has shape "
                            f"{self.activation_values.shape}, expected ({n_active},)")
    if self.logit_probabilities.shape != self.logit_tokens.shape:
      raise TranscoderError(f"{source}: {self.logit_probabilities.shape[0]} logit probabilities "
                            f"for {self.logit_tokens.shape[0]} logit tokens")
    sel = self.selected_features
    if sel.size and (sel.min() < 0 or sel.max() >= n_active):
      raise TranscoderError(f"{source}: selected_features index outside the {n_active} active "
                            "features")
    rest = self.n_nodes - self.n_features - self.n_logits
    if self.n_pos == 0 or rest % self.n_pos or rest // self.n_pos < 2:
      raise TranscoderError(f"{source}: {self.n_nodes} nodes do not fit {self.n_features} "
                            f"features, {self.n_pos} positions and {self.n_logits} logits")
    return self


def save_npz(graph: AttributionGraph, path: str | os.PathLike) -> None:
  """Write `graph.npz` with the arrays of `NPZ_ARRAYS`."""
  graph.validate()
  np.savez(path, **{k: getattr(graph, k) for k in NPZ_ARRAYS})


def load_npz(path: str | os.PathLike) -> AttributionGraph:
  """Read a `graph.npz` written by `save_npz` (TranscoderError: one line)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TranscoderError(f"{path}: no such file")
  try:
    with np.load(path) as z:
      missing = [k for k in NPZ_ARRAYS if k not in z.files]
      if missing:
        raise TranscoderError(f"{path}: not a graph.npz (no {', '.join(missing)})")
      arrays = {k: z[k] for k in NPZ_ARRAYS}
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, TranscoderError):
      raise
    raise TranscoderError(f"{path}: unreadable npz ({str(e).splitlines()[0]})") from None
  return AttributionGraph(**arrays).validate(path)
