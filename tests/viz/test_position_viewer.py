"""The position-level circuit viewer (`jaxinterp.viz.position_viewer`): the page is written, is
self-contained and ships graph.json's edges exactly; `experiments.view` draws a position graph.json;
in headless Chromium (the shared fixture of tests/viz/conftest.py; skipped without it) every edge is
drawn between the right position columns, hovering an edge shows its name and score and clicking a
node lists its in- and out-edges."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from jaxinterp.circuits import positions as cpos
from jaxinterp.runtime import inputs
from jaxinterp.viz import page, plots, position_viewer
from tests.viz.browser import open_page
from tests.viz.test_graph_viewer import _Parser
from tests.viz.test_position_plot import _scores

N_EDGES = 24


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
  s = _scores(n_pos=7, seed=1)
  edges = s.select(N_EDGES)
  path = tmp_path_factory.mktemp("position_viewer") / "graph.json"
  cpos.to_json(s, path, edges=edges, meta={"method": "EAP-IG-inputs", "task": "toy",
                                           "level": "position", "faithfulness": 0.5})
  return path


@pytest.fixture(scope="module")
def graph_obj(graph_path):
  with open(graph_path) as f:
    return json.load(f)


TOKENS = ["<bos>", "a", "</script>", "c", "d", "e"]  # 6 labels for 7 positions: the last is blank


def _data(text: str) -> dict:
  p = _Parser()
  p.feed(text)
  p.close()
  assert not [t for t, a in p.tags if "src" in a or (t == "link" and "href" in a)]
  assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # no network
  return json.loads(p.data)


def test_page_is_self_contained_and_ships_the_edges(tmp_path, graph_path, graph_obj):
  out = position_viewer.write_html(graph_path, tmp_path / "circuit.html", tokens=TOKENS)
  d = _data(open(out, encoding="utf-8").read())
  e = d["links"]
  assert list(zip(e["name"], e["w"], strict=True)) == list(graph_obj["edges"].items())
  nodes = d["nodes"]
  assert d["title"] == "EAP-IG-inputs on toy, position level" and d["mode"] == "position"
  assert d["row_names"] == ["input", "attn 0", "mlp 0", "attn 1", "mlp 1", "logits"]
  lay = cpos.from_json(graph_path).layout
  crossing = 0
  for name, s, t, q in zip(e["name"], e["s"], e["t"], e["qkv"], strict=True):
    sender, ps, receiver, pr = name.replace("->", "@").split("@")
    node, qkv = plots.receiver_parts(receiver)
    assert nodes[s]["name"] == f"{sender}@{ps}" and nodes[t]["name"] == f"{node}@{pr}"
    assert d["columns"][nodes[s]["pos"]] == int(ps) and d["columns"][nodes[t]["pos"]] == int(pr)
    assert q == (qkv or "") and nodes[s]["row"] < nodes[t]["row"]
    crossing += ps != pr
    cpos.parse_edge_name(lay, name)
  assert crossing > 0 and {np.sign(w) for w in e["w"]} == {-1.0, 1.0}
  assert d["columns"] == sorted({int(p) for n in e["name"] for p in n.replace("->", "@")
                                 .split("@")[1::2]})
  assert d["prompt_tokens"] == [(TOKENS + [""])[p] for p in d["columns"]]
  assert d["max_abs_weight"] == max(abs(w) for w in e["w"])
  # max_drawn keeps the strongest edges, in graph.json's order
  few = position_viewer.page_data(graph_obj, max_drawn=5)["links"]
  strongest = sorted(graph_obj["edges"].items(), key=lambda kv: -abs(kv[1]))[:5]
  assert sorted(few["name"]) == sorted(n for n, _ in strongest)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, graph_obj):
  bad = json.loads(json.dumps(graph_obj))
  bad["edges"]["a9.h0@1->m0@1"] = 1.0
  with pytest.raises(position_viewer.PositionViewerError, match="a9.h0@1->m0@1") as e:
    position_viewer.write_html(bad, tmp_path / "c.html")
  assert "\n" not in str(e.value)
  with pytest.raises(position_viewer.PositionViewerError, match="8 labels for 7 positions"):
    position_viewer.write_html(graph_obj, tmp_path / "c.html", tokens=list("abcdefgh"))
  with pytest.raises(position_viewer.PositionViewerError, match="not a jaxinterp-position"):
    position_viewer.write_html({"edges": {}}, tmp_path / "c.html")
  assert not (tmp_path / "c.html").exists()


def test_view_page_draws_a_position_graph(tmp_path, graph_path, graph_obj):
  out = page.write_page(page.ViewConfig(graph=str(graph_path), out=str(tmp_path / "v.html")))
  d = _data(open(out, encoding="utf-8").read())
  assert d["links"]["name"] == list(graph_obj["edges"])
  for field, message in (("n", "--n: a position-level graph's page draws all its edges"),
                         ("curve", "--curve: a position-level graph's page shows no curve")):
    value = 3 if field == "n" else str(graph_path)
    with pytest.raises(inputs.InputError, match=message):
      page.write_page(page.ViewConfig(graph=str(graph_path), out=str(tmp_path / "w.html"),
                                      **{field: value}))
  assert not (tmp_path / "w.html").exists()


# --------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def html_page(tmp_path_factory, graph_path):
  path = tmp_path_factory.mktemp("position_page") / "circuit.html"
  position_viewer.write_html(graph_path, path, tokens=TOKENS)
  return path


def test_browser_draws_every_edge_between_columns(browser, html_page, graph_obj):
  d = browser
  open_page(d, html_page)
  drawn = d.execute_script(
      "return [...document.querySelectorAll('#links path')].map(p => {"
      " const l = p.getTotalLength(), a = p.getPointAtLength(0), b = p.getPointAtLength(l);"
      " return [+p.dataset.i, a.x, b.x, p.getAttribute('stroke-dasharray'),"
      " p.classList.contains('pos')]; });")
  assert len(drawn) == N_EDGES == len(graph_obj["edges"])
  assert len(d.find_elements("css selector", "#link-hits path")) == N_EDGES
  names, weights = list(graph_obj["edges"]), list(graph_obj["edges"].values())
  columns, bounds = d.execute_script(  # the columns' positions and their boundaries' x
      "return [JSON.parse(document.getElementById('graph-data').textContent).columns,"
      " [...document.querySelectorAll('#grid .col-line')].map(l => +l.getAttribute('x1'))];")
  labels = [t.text for t in d.find_elements("css selector", "#grid .col-label")]
  assert labels == [(TOKENS + [""])[p] for p in columns] and "</script>" in labels

  def column(x):
    return columns[int(np.searchsorted(bounds, x)) - 1]

  for i, x0, x1, dash, positive in drawn:
    _, ps, receiver, pr = names[i].replace("->", "@").split("@")
    assert positive == (weights[i] >= 0)
    assert (dash is None) == (plots.receiver_parts(receiver)[1] is None), names[i]
    assert (column(x0), column(x1)) == (int(ps), int(pr)), names[i]  # key column -> query column


def test_browser_hover_and_click(browser, html_page, graph_obj):
  from selenium.webdriver.common.actions.action_builder import ActionBuilder
  from selenium.webdriver.common.by import By
  d = browser
  open_page(d, html_page)
  names, weights = list(graph_obj["edges"]), list(graph_obj["edges"].values())
  checked = set()
  for i in sorted(range(len(names)), key=lambda k: -abs(weights[k])):  # strongest first
    # A point on the edge's stroke, in viewport pixels; whichever edge is on top there is hovered.
    x, y, top = d.execute_script("""
      const p = document.querySelector(`#links path[data-i="${arguments[0]}"]`);
      const q = p.getPointAtLength(p.getTotalLength() * 0.4).matrixTransform(p.getScreenCTM());
      const hit = document.elementFromPoint(q.x, q.y);
      return [q.x, q.y, hit && hit.dataset.i !== undefined ? +hit.dataset.i : -1];""", i)
    if top < 0:  # a node covers that point
      continue
    action = ActionBuilder(d)
    action.pointer_action.move_to_location(int(round(x)), int(round(y)))
    action.perform()
    tip = d.find_element(By.ID, "tooltip")
    assert tip.is_displayed() and tip.text.splitlines()[1].startswith("score ")
    assert tip.find_element(By.CLASS_NAME, "tip-name").text == names[top]
    assert float(tip.find_element(By.CLASS_NAME, "tip-weight").text) == pytest.approx(
        weights[top], rel=1e-3)
    checked.add(top)
    if len(checked) == 5:
      break
  assert len(checked) == 5
  i = max(range(len(names)), key=lambda k: abs(weights[k]))
  # clicking the receiver's node lists its in- and out-edges by name
  receiver = names[i].split("->")[1]
  node, _ = plots.receiver_parts(receiver.split("@")[0])
  node_name = f"{node}@{receiver.split('@')[1]}"
  idx = d.execute_script("return JSON.parse(document.getElementById('graph-data').textContent)"
                         ".nodes.findIndex(n => n.name === arguments[0])", node_name)
  assert idx >= 0
  d.find_element(By.CSS_SELECTOR, f'#nodes .node[data-node="{idx}"]').click()
  assert d.find_element(By.ID, "node-title").text == node_name
  into = {n for n in names if plots.receiver_parts(n.split("->")[1].split("@")[0])[0] + "@"
          + n.split("@")[-1] == node_name}
  out_of = {n for n in names if n.split("->")[0] == node_name}
  for cls, want in (("inputs", into), ("outputs", out_of)):
    rows = d.find_elements(By.CSS_SELECTOR, f"#node-info table.{cls} td:first-child")
    got = [r.text for r in rows]
    assert sorted(got) == sorted(want), cls
  assert names[i] in into
  assert len(d.find_elements(By.CSS_SELECTOR, "#links path.hl")) == len(into) + len(out_of)


def test_browser_screenshot_shows_the_circuit(browser, html_page):
  import matplotlib.pyplot as plt
  d = browser
  open_page(d, html_page)
  png = d.get_screenshot_as_png()
  if os.environ.get("POSITION_VIEWER_SCREENSHOT"):  # a copy to look at
    with open(os.environ["POSITION_VIEWER_SCREENSHOT"], "wb") as f:
      f.write(png)
  img = plt.imread(io.BytesIO(png), format="png")[..., :3]

  def near(hex_color):
    c = np.array([int(hex_color[j:j + 2], 16) / 255 for j in (1, 3, 5)])
    return (np.abs(img - c).max(axis=-1) < 0.12).sum()

  assert near(plots.POSITIVE_COLOR) > 50 and near(plots.NEGATIVE_COLOR) > 50
  assert near("#9ecae1") > 50 and near("#f2c14e") > 50  # head and MLP nodes


def test_browser_empty_circuit_loads(browser, tmp_path, graph_obj):
  empty = dict(graph_obj, edges={})
  path = position_viewer.write_html(empty, tmp_path / "empty.html")
  open_page(browser, path)  # no script error
  assert browser.execute_script("return document.querySelectorAll('#links path').length") == 0
  assert "0 position edges over 0 of 7 positions" in browser.find_element("id", "meta").text
