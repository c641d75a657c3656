"""The position-level circuit plot: edges between position columns, in graph.json's sign."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits.layout import GraphShape, layout_for, shape_key
from jaxinterp.viz import plots, position_plot

SHAPE = GraphShape(2, 3)


def _scores(n_pos=6, seed=0) -> cpos.PositionScores:
  lay = layout_for(shape_key(SHAPE))
  rng = np.random.default_rng(seed)
  kv = cpos.kv_receivers(SHAPE)
  local = np.where(lay.valid[None], rng.normal(size=(n_pos, *lay.valid.shape)), 0.0)
  local[:, :, kv] = 0.0
  cross = rng.normal(size=(n_pos * (n_pos + 1) // 2, lay.n_senders, kv.size))
  cross = np.where(lay.valid[:, kv][None], cross, 0.0)
  return cpos.PositionScores(SHAPE, local.astype(np.float32), cross.astype(np.float32))


def _has(img: np.ndarray, hex_color: str, tol: float = 0.08) -> bool:
  rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  return bool((np.abs(img[..., :3] - rgb).max(-1) < tol).any())


def test_plot_draws_both_signs_and_crossing_edges(tmp_path):
  s = _scores()
  edges = s.select(15)
  assert any(e[1] != e[3] for e in edges) and {np.sign(e[4]) for e in edges} == {-1.0, 1.0}
  path = tmp_path / "c.png"
  position_plot.plot_position_circuit(s, edges, str(path), tokens=list("abcdef"), title="t")
  img = mpimg.imread(path)
  assert img.shape[0] > 200 and img.shape[1] > 400
  assert _has(img, plots.POSITIVE_COLOR) and _has(img, plots.NEGATIVE_COLOR)


def test_empty_circuit_and_bad_input(tmp_path):
  s = _scores()
  position_plot.plot_position_circuit(s, [], str(tmp_path / "e.png"))
  assert (tmp_path / "e.png").stat().st_size > 0
  with pytest.raises(plots.PlotError, match="tokens: 2 labels for 6 positions"):
    position_plot.plot_position_circuit(s, s.select(3), str(tmp_path / "x.png"), tokens=["a", "b"])
  with pytest.raises(plots.PlotError, match="PositionScores"):
    position_plot.plot_position_circuit(np.zeros(3), [], str(tmp_path / "y.png"))
  assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
