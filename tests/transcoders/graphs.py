"""Random attribution graphs with circuit-tracer's node layout and a DAG's structure, for the
pruning, score and frontend tests."""

from __future__ import annotations

import numpy as np

from jaxinterp.transcoders.graph import AttributionGraph


def random_graph(seed: int, n_layers: int = 2, n_pos: int = 4, n_active: int = 12,
                 n_features: int | None = None, n_logits: int = 3, vocab_size: int = 50,
                 density: float = 0.5) -> AttributionGraph:
  """A graph whose edges run from earlier layers (tokens first) to later ones and from earlier or
  equal positions, with rows only for features and logits, as circuit-tracer's graphs."""
  rng = np.random.default_rng(seed)
  cells = [(la, p, f) for la in range(n_layers) for p in range(1, n_pos) for f in range(40)]
  pick = np.sort(rng.choice(len(cells), n_active, replace=False))
  active = np.array([cells[i] for i in pick], np.int64)
  nf = n_active if n_features is None else n_features
  selected = np.sort(rng.choice(n_active, nf, replace=False)).astype(np.int64)
  # depth (tokens 0, layer l's features and errors l + 1, logits n_layers + 1) and position
  depth = np.concatenate([active[selected, 0] + 1, np.repeat(np.arange(n_layers) + 1, n_pos),
                          np.zeros(n_pos, np.int64), np.full(n_logits, n_layers + 1)])
  pos = np.concatenate([active[selected, 1], np.tile(np.arange(n_pos), n_layers),
                        np.arange(n_pos), np.full(n_logits, n_pos - 1)])
  n = len(depth)
  allowed = (depth[None, :] < depth[:, None]) & (pos[None, :] <= pos[:, None])
  has_row = np.zeros(n, bool)
  has_row[:nf] = True
  has_row[n - n_logits:] = True
  mask = allowed & has_row[:, None] & (rng.random((n, n)) < density)
  adjacency = (rng.normal(size=(n, n)) * rng.lognormal(size=(n, n)) * mask).astype(np.float32)
  probs = rng.dirichlet(np.ones(n_logits)).astype(np.float32) * np.float32(0.9)
  return AttributionGraph(
      adjacency=adjacency, active_features=active, selected_features=selected,
      activation_values=rng.uniform(0.1, 3.0, n_active).astype(np.float32),
      input_tokens=rng.integers(0, vocab_size, n_pos).astype(np.int64),
      logit_tokens=rng.choice(vocab_size, n_logits, replace=False).astype(np.int64),
      logit_probabilities=np.sort(probs)[::-1].copy()).validate()
