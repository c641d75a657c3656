"""The attribution-graph viewer (`jaxinterp.viz.graph_viewer`): the page is written, parses, is
self-contained and ships graph.json's nodes and links exactly; in headless Chromium (Debian's
`chromium` and `chromium-driver`, driven by selenium; skipped, with the reason, when missing) every
node and link is drawn, hovering a node shows its values and clicking one lists its inputs and
outputs."""

from __future__ import annotations

import html.parser
import io
import json

import numpy as np
import pytest

from jaxinterp.transcoders import frontend
from jaxinterp.viz import graph_viewer
from tests.transcoders.graphs import random_graph
from tests.viz.browser import open_page


@pytest.fixture(scope="module")
def graph_obj():
  g = random_graph(3, n_layers=3, n_pos=6, n_active=30, n_logits=3)
  return frontend.graph_json(g, slug="t", scan="toy", prompt="a b c d e f",
                             prompt_tokens=["<bos>", "a", "b", "c", "d", "e"],
                             logit_labels=["x", "</script>", "z"], node_threshold=0.9,
                             edge_threshold=0.95)


class _Parser(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags, self.data, self._in = [], None, False

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    self._in = dict(attrs).get("id") == "graph-data"

  def handle_data(self, data):
    if self._in:
      self.data = (self.data or "") + data

  def handle_endtag(self, tag):
    self._in = False


def test_page_is_written_parses_and_ships_the_graph(tmp_path, graph_obj):
  path = tmp_path / "graph.json"
  path.write_text(json.dumps(graph_obj))
  out = graph_viewer.write_html(path, tmp_path / "graph.html")
  text = open(out, encoding="utf-8").read()
  p = _Parser()
  p.feed(text)
  p.close()
  # self-contained: no external script, stylesheet, image or URL other than the SVG namespace
  assert not [t for t, a in p.tags if "src" in a or (t == "link" and "href" in a)]
  assert "http" not in text.replace("http://www.w3.org/2000/svg", "")
  data = json.loads(p.data)
  assert [n["id"] for n in data["nodes"]] == [n["node_id"] for n in graph_obj["nodes"]]
  ids = [n["id"] for n in data["nodes"]]
  links = [(ids[s], ids[t], w) for s, t, w in zip(*data["links"].values(), strict=True)]
  assert links == [(e["source"], e["target"], e["weight"]) for e in graph_obj["links"]]
  assert data["n_layers"] == 3 and data["max_abs_weight"] == max(abs(e["weight"])
                                                                 for e in graph_obj["links"])
  kinds = {n["type"] for n in data["nodes"]}
  assert kinds == {"feature", "error", "embedding", "logit"}
  rows = {n["type"]: n["row"] for n in data["nodes"] if n["type"] in ("embedding", "logit")}
  assert rows == {"embedding": 0, "logit": 4}
  assert any(n["label"] == "</script>" for n in data["nodes"])  # escaped, survives the script tag


def test_bad_graph_is_one_line_and_writes_nothing(tmp_path, graph_obj):
  bad = json.loads(json.dumps(graph_obj))
  bad["links"][0]["target"] = "nope"
  with pytest.raises(graph_viewer.GraphViewerError, match="missing 'nope'") as e:
    graph_viewer.write_html(bad, tmp_path / "g.html")
  assert "\n" not in str(e.value) and not (tmp_path / "g.html").exists()
  (tmp_path / "x.json").write_text("{")
  with pytest.raises(graph_viewer.GraphViewerError, match="cannot read graph.json"):
    graph_viewer.write_html(tmp_path / "x.json", tmp_path / "g.html")


@pytest.fixture(scope="module")
def page(tmp_path_factory, graph_obj):
  path = tmp_path_factory.mktemp("graph_viewer") / "graph.html"
  graph_viewer.write_html(graph_obj, path, title="test graph")
  return path


def test_browser_draws_every_node_and_link(browser, page, graph_obj):
  d = browser
  open_page(d, page)
  n_nodes, n_links, n_hits, inside = d.execute_script(
      "const s = document.getElementById('graph').viewBox.baseVal;"
      "const nodes = [...document.querySelectorAll('#nodes .node')];"
      "const ok = nodes.every(g => { const m = g.transform.baseVal[0].matrix;"
      "  return m.e > 0 && m.e < s.width && m.f > 0 && m.f < s.height; });"
      "return [nodes.length, document.querySelectorAll('#links path').length,"
      " document.querySelectorAll('#link-hits path').length, ok];")
  assert (n_nodes, n_links, n_hits) == (len(graph_obj["nodes"]), len(graph_obj["links"]),
                                        len(graph_obj["links"]))
  assert inside
  # no two nodes overlap
  xy = np.array(d.execute_script(
      "return [...document.querySelectorAll('#nodes .node')].map(g => {"
      " const m = g.transform.baseVal[0].matrix; return [m.e, m.f]; });"))
  dist = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
  assert dist.min() >= 12


def test_browser_hover_and_click_show_the_node(browser, page, graph_obj):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  d = browser
  open_page(d, page)
  nodes = graph_obj["nodes"]
  i = next(k for k, n in enumerate(nodes) if n["feature_type"] == "cross layer transcoder")
  g = d.find_element(By.CSS_SELECTOR, f'#nodes .node[data-node="{i}"]')
  ActionChains(d).move_to_element(g).perform()
  tip = d.find_element(By.ID, "tooltip")
  assert tip.is_displayed()
  layer, feat, pos = nodes[i]["node_id"].split("_")
  assert tip.find_element(By.CLASS_NAME, "tip-name").text == f"L{layer} #{feat} @{pos}"
  assert float(tip.find_element(By.CLASS_NAME, "tip-activation").text) == pytest.approx(
      nodes[i]["activation"], rel=1e-3)
  assert float(tip.find_element(By.CLASS_NAME, "tip-influence").text) == pytest.approx(
      nodes[i]["influence"], rel=1e-3)
  g.click()
  node_id = nodes[i]["node_id"]
  want_in = sorted(abs(e["weight"]) for e in graph_obj["links"] if e["target"] == node_id)
  want_out = sorted(abs(e["weight"]) for e in graph_obj["links"] if e["source"] == node_id)
  for cls, want in (("inputs", want_in), ("outputs", want_out)):
    got = d.find_elements(By.CSS_SELECTOR, f"#node-info table.{cls} td.num")
    assert sorted(abs(float(c.text)) for c in got) == pytest.approx(want, rel=1e-3)
  assert len(d.find_elements(By.CSS_SELECTOR, "#links path.hl")) == len(want_in) + len(want_out)


def test_browser_screenshot_shows_the_graph(browser, page):
  import matplotlib.pyplot as plt
  d = browser
  open_page(d, page)
  img = plt.imread(io.BytesIO(d.get_screenshot_as_png()), format="png")[..., :3]
  blue, red = np.array([0x1f, 0x5f, 0xb4]) / 255, np.array([0xc4, 0x30, 0x2b]) / 255
  yellow = np.array([0xf2, 0xc1, 0x4e]) / 255  # feature nodes

  def near(c):
    return (np.abs(img - c).max(axis=-1) < 0.12).sum()

  assert near(blue) > 50 and near(red) > 50 and near(yellow) > 50
