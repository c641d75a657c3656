"""Plots: circuits, faithfulness curves and heatmaps are written as valid PNGs, atomically."""

import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from jaxinterp import patching
from jaxinterp.circuits import Graph
from jaxinterp.evaluation.faithfulness import FaithfulnessCurve
from jaxinterp.models import ModelConfig
from jaxinterp.viz import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CFG = ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=3, d_head=4, d_mlp=32, d_vocab=20,
                  n_ctx=16)


def _check_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  img = plt.imread(path)
  assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
  assert np.ptp(img[..., :3]) > 0  # not a blank image
  leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]
  assert not leftovers, f"temp files left behind: {leftovers}"


@pytest.fixture
def scored_graph():
  valid = Graph.from_config(CFG).valid
  scores = np.random.default_rng(0).normal(size=valid.shape)
  return Graph.from_config(CFG, scores)


def test_circuit_png(tmp_path, scored_graph):
  circuit = scored_graph.top_n(20, prune=False)
  assert circuit.count_edges() == 20
  path = tmp_path / "circuit.png"
  plots.plot_circuit(circuit, str(path), title="random")
  _check_png(str(path))
  # Fewer edges drawn than exist, the full graph, and the empty circuit all draw.
  plots.plot_circuit(scored_graph.full(), str(tmp_path / "full.png"), max_edges=10)
  _check_png(str(tmp_path / "full.png"))
  plots.plot_circuit(scored_graph.empty(), str(tmp_path / "empty.png"))
  _check_png(str(tmp_path / "empty.png"))


def test_circuit_overwrites_atomically(tmp_path, scored_graph):
  path = tmp_path / "c.png"
  path.write_bytes(b"old")
  plots.plot_circuit(scored_graph.top_n(5, prune=False), str(path))
  _check_png(str(path))


def test_faithfulness_png(tmp_path):
  curve = FaithfulnessCurve(n_edges=np.array([0, 2, 10, 40]), n_edges_kept=np.array([0, 2, 9, 40]),
                            percentages=np.array([0.1, 1.0, 10.0, 100.0]), metric=np.zeros(4),
                            faithfulness=np.array([0.0, 0.4, 0.9, 1.0]), m_full=2.0, m_empty=-1.0)
  path = tmp_path / "f.png"
  plots.plot_faithfulness(curve, str(path), title="curve")
  _check_png(str(path))
  positive = FaithfulnessCurve(np.array([1, 5, 50]), np.array([1, 5, 50]), np.array([1., 5, 50]),
                               np.zeros(3), np.array([0.2, np.nan, 1.1]), 1.0, 0.0)
  plots.plot_faithfulness(positive, str(tmp_path / "g.png"))
  _check_png(str(tmp_path / "g.png"))


def test_heatmap_png(tmp_path):
  v = np.random.default_rng(1).normal(size=(3, 7))
  v[0, 0] = np.nan
  path = tmp_path / "h.png"
  plots.plot_heatmap(v, str(path), xlabel="position", ylabel="layer", title="t",
                     xticklabels=[f"p{i}" for i in range(7)], yticklabels=["a", "b", "c"])
  _check_png(str(path))
  # many columns: thinned ticks, no annotations
  big = np.random.default_rng(2).normal(size=(4, 120))
  plots.plot_heatmap(big, str(tmp_path / "big.png"), xlabel="x", ylabel="y", title="big")
  _check_png(str(tmp_path / "big.png"))


def test_patching_result_png(tmp_path):
  sw = patching.get_sweep("head_out_by_pos")
  v = np.random.default_rng(3).normal(size=(2, 5, 3))
  r = patching.PatchingResult(sw, "noising", v, v, 1.0, 0.0, ("layer", "position", "head"), 4)
  plots.plot_patching(r, str(tmp_path / "3d.png"), position_labels=list("abcde"))
  _check_png(str(tmp_path / "3d.png"))
  sw2 = patching.get_sweep("head_q")
  r2 = patching.PatchingResult(sw2, "denoising", v[:, 0], v[:, 0], 1.0, 0.0, ("layer", "head"), 4)
  plots.plot_patching(r2, str(tmp_path / "2d.png"))
  _check_png(str(tmp_path / "2d.png"))


def test_bad_inputs(tmp_path, scored_graph):
  with pytest.raises(plots.PlotError, match="2-D"):
    plots.plot_heatmap(np.zeros(4), str(tmp_path / "x.png"), xlabel="", ylabel="", title="")
  with pytest.raises(plots.PlotError, match="labels"):
    plots.plot_heatmap(np.zeros((2, 3)), str(tmp_path / "x.png"), xlabel="", ylabel="", title="",
                       xticklabels=["a"])
  with pytest.raises(plots.PlotError, match="Graph"):
    plots.plot_circuit("graph.json", str(tmp_path / "x.png"))
  with pytest.raises(plots.PlotError, match="max_edges"):
    plots.plot_circuit(scored_graph, str(tmp_path / "x.png"), max_edges=0)
  with pytest.raises(plots.PlotError, match="cannot write"):
    plots.plot_circuit(scored_graph, str(tmp_path / "missing_dir" / "x.png"))
  assert not os.path.exists(tmp_path / "x.png")


@pytest.fixture
def figures(monkeypatch):
  """The figures the plot functions would save (they are not written or closed)."""
  saved = []
  monkeypatch.setattr(plots, "save_png", lambda fig, path: saved.append(fig))
  yield saved
  for fig in saved:
    plt.close(fig)


def test_circuit_draws_the_files_sign_with_a_legend(figures):
  valid = Graph.from_config(CFG).valid
  scores = np.where(valid, np.random.default_rng(4).normal(size=valid.shape), 0).astype(np.float32)
  metric = Graph.from_config(CFG, scores, "metric").top_n(12, prune=False)
  loss = Graph.from_config(CFG, -scores, "loss").top_n(12, prune=False)
  for a, b in zip(plots.drawn_edges(metric), plots.drawn_edges(loss), strict=True):
    assert np.array_equal(a, b)  # the same edges, the same signs, whatever the convention
  s, r, v = plots.drawn_edges(metric)
  assert np.array_equal(v, -scores[s, r]) and len(v) == 12
  plots.plot_circuit(metric, "unused.png", title="EAP on ioi")
  legend = figures[0].axes[0].get_legend()
  assert legend.get_title().get_text().replace("\n", " ") == "score: " + \
      plots.convention.DISPLAYED
  texts = [t.get_text() for t in legend.get_texts()]
  assert plots.POSITIVE_LABEL in texts and plots.NEGATIVE_LABEL in texts
  colors = {p.get_edgecolor()[:3] for p in figures[0].axes[0].patches}
  rgb = {name: plt.matplotlib.colors.to_rgb(c) for name, c in
         (("pos", plots.POSITIVE_COLOR), ("neg", plots.NEGATIVE_COLOR))}
  assert colors <= set(rgb.values()) and len(colors) == 2
  assert figures[0].axes[0].get_title().startswith("EAP on ioi")


def test_faithfulness_axis_says_what_it_counts(figures):
  curve = FaithfulnessCurve(np.array([1, 5, 50]), np.array([1, 4, 30]), np.array([1., 5, 50]),
                            np.array([.1, .5, .9]), np.array([.1, .5, .9]), 1.0, 0.0)
  plots.plot_faithfulness(curve, "unused.png", title="EAP on ioi")
  ax = figures[0].axes[0]
  assert ax.get_xlabel() == plots.FAITHFULNESS_XLABEL and "before pruning" in ax.get_xlabel()
  assert np.array_equal(ax.lines[0].get_xdata(), [1, 5, 50])  # requested n, not n_edges_kept


@pytest.mark.parametrize("direction,neutral", [("noising", 1.0), ("denoising", 0.0)])
def test_patching_heatmap_shows_the_normalised_number(figures, direction, neutral):
  sw = patching.get_sweep("head_out")
  v = np.array([[0.98, 0.04], [0.63, 1.7]])
  r = patching.PatchingResult(sw, direction, v * 3, v, 3.0, 0.0, ("layer", "head"), 4)
  grid = plots.patching_grid(r)
  assert grid.neutral == neutral and np.array_equal(grid.values, v)
  plots.plot_patching(r, "unused.png", title="activation patching, ioi")
  ax = figures[0].axes[0]
  im = ax.get_images()[0]
  assert np.array_equal(np.asarray(im.get_array()), v)  # drawn as computed, not shifted
  assert im.norm.vcenter == neutral and im.norm.vmin + im.norm.vmax == 2 * neutral
  assert sorted(t.get_text() for t in ax.texts) == sorted(f"{x:.2f}" for x in v.ravel())
  assert plots.NORMALIZED in figures[0].axes[1].get_ylabel().replace("\n", " ")
  assert ax.get_title().startswith("activation patching, ioi: head_out")
