"""The span-level circuit plot: span edges between the schema's span columns, at most a fixed
number of them (the circuit's best), in graph.json's sign."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.patches import FancyArrowPatch

from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.circuits.layout import GraphShape
from jaxinterp.viz import plots, span_plot

SHAPE = GraphShape(2, 3)
NAMES = ("bos", "prefix", "first_A", "last")


def _scores(seed=0) -> S.SpanScores:
  rng = np.random.default_rng(seed)
  local, crossing = SC.edge_masks(SHAPE, len(NAMES))
  return S.SpanScores(SHAPE, NAMES, np.where(local, rng.normal(size=local.shape), 0.0
                                             ).astype(np.float32),
                      np.where(crossing, rng.normal(size=crossing.shape), 0.0).astype(np.float32),
                      "sum", 3)


@pytest.fixture
def drawn_figure(monkeypatch):
  """What `plots.save_png` is handed: the title, x tick labels and the arrows drawn."""
  seen, save = {}, plots.save_png

  def spy(fig, path):
    ax = fig.axes[0]
    seen.update(title=ax.get_title(), labels=[t.get_text() for t in ax.get_xticklabels()],
                arrows=[p for p in ax.patches if isinstance(p, FancyArrowPatch)])
    save(fig, path)
  monkeypatch.setattr(plots, "save_png", spy)
  return seen


def test_draws_the_top_edges_over_every_span(tmp_path, drawn_figure):
  s = _scores()
  circuit = SC.select(s, 15)
  assert any(e[1] != e[3] for e in circuit) and {np.sign(e[4]) for e in circuit} == {-1.0, 1.0}
  path = tmp_path / "c.png"
  tokens = [[], ["5", "6", "7", "8", "9"], ["7"], ["7"]]
  drawn = span_plot.plot_span_circuit(s, circuit, str(path), tokens=tokens, title="t",
                                      max_edges=12)
  assert drawn == SC.select(s, 12)  # the circuit's best 12, in its order
  assert len(drawn_figure["arrows"]) == 12
  assert drawn_figure["title"] == "t\n12 of 15 span edges drawn"
  assert drawn_figure["labels"] == ["bos\n(empty)", "prefix\n5 6 … 9 (5)", "first_A\n7",
                                    "last\n7"]  # every span, in the schema's order
  img = mpimg.imread(path)
  assert path.stat().st_size > 10_000 and img.shape[0] > 200 and img.shape[1] > 400
  assert _has(img, plots.POSITIVE_COLOR) and _has(img, plots.NEGATIVE_COLOR)
  # Fewer edges than the limit: all drawn; no edges: the empty columns.
  assert span_plot.plot_span_circuit(s, circuit[:3], str(path)) == circuit[:3]
  assert drawn_figure["title"] == "3 of 3 span edges drawn"
  assert drawn_figure["labels"] == list(NAMES)
  assert span_plot.plot_span_circuit(s, [], str(tmp_path / "e.png")) == []
  assert (tmp_path / "e.png").stat().st_size > 0


def _has(img: np.ndarray, hex_color: str, tol: float = 0.08) -> bool:
  rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  return bool((np.abs(img[..., :3] - rgb).max(-1) < tol).any())


def test_span_tokens_and_labels():
  spans = np.array([[0, 1], [1, 1], [1, 4]])
  assert span_plot.span_tokens(spans, ["a", "b", "c", "d"]) == [["a"], [], ["b", "c", "d"]]
  assert span_plot.span_label("x", None) == "x"
  assert span_plot.span_label("x", ["1", "2", "3", "4"]) == "x\n1 2 3 4"
  with pytest.raises(plots.PlotError, match="spans reach position 4, past the row's 3 tokens"):
    span_plot.span_tokens(spans, ["a", "b", "c"])


def test_bad_input_is_refused_before_writing(tmp_path):
  s = _scores()
  lay, out = s.layout, tmp_path / "x.png"
  local = next(e for e in SC.select(s, 50) if e[1] == e[3] and e[2] not in
               set(cpos.kv_receivers(SHAPE).tolist()))
  for args, kw, message in [
      ((np.zeros(3), []), {}, "needs SpanScores"),
      ((s, SC.select(s, 3)), dict(tokens=[["a"]]), "tokens: 1 lists for 4 spans"),
      ((s, [(0, 0, local[2], 7, 1.0)]), {}, f"edge {lay.edge_name(0, local[2])} from span 0 to "
                                            "span 7: the schema has 4 spans"),
      ((s, [(local[0], 0, local[2], 1, 1.0)]), {}, "non-crossing edges stay within a span"),
      ((s, []), dict(max_edges=-1), "max_edges: -1 < 0"),
  ]:
    with pytest.raises(plots.PlotError, match=message):
      span_plot.plot_span_circuit(*args, str(out), **kw)
  assert not out.exists()
