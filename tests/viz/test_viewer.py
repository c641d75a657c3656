"""The interactive circuit viewer: its Python side, its binary, and the page in headless Chromium.

The browser tests drive `circuit.html` with selenium and chromedriver (Debian's `chromium` and
`chromium-driver`); they skip, with the reason, when either is missing.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxinterp.circuits import MIB_PERCENTAGES, Graph, GraphShape, n_edges_at_percentage
from jaxinterp.models import ModelConfig
from jaxinterp.runtime import inputs
from jaxinterp.viz import page, viewer
from tests.viz.browser import open_page

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2_SMALL = ModelConfig(family="gpt2", d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072,
                         d_vocab=50257, n_ctx=1024)
SMALL = ModelConfig(family="gpt2", d_model=16, n_layers=3, n_heads=4, d_head=4, d_mlp=32,
                    d_vocab=20, n_ctx=16)


def planted_scores(shape, seed: int, n_paths: int) -> np.ndarray:
  """Small random scores plus `n_paths` strong input -> ... -> logits paths, so that small top-n
  circuits survive pruning (with purely random scores they are empty up to ~10% of the edges)."""
  g = Graph.from_config(shape)
  L = g.layout
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=g.valid.shape) * 0.05
  for _ in range(n_paths):
    prev = 0  # input
    layers = sorted(rng.choice(L.n_layers, size=rng.integers(1, min(3, L.n_layers) + 1),
                               replace=False))
    for layer in layers:
      if rng.random() < 0.25:
        name, recv = f"m{layer}", f"m{layer}"
      else:
        h = rng.integers(L.n_heads)
        name, recv = f"a{layer}.h{h}", f"a{layer}.h{h}<{'qkv'[rng.integers(3)]}>"
      scores[prev, L.receiver_index[recv]] = rng.choice([-1, 1]) * rng.uniform(0.5, 3)
      prev = L.sender_index[name]
    scores[prev, L.logits_receiver] = rng.choice([-1, 1]) * rng.uniform(0.5, 3)
  return np.where(g.valid, scores, 0)


@pytest.fixture(scope="module")
def small_graph():
  return Graph.from_config(SMALL, planted_scores(SMALL, 0, 6))


@pytest.fixture(scope="module")
def gpt2_graph():
  return Graph.from_config(GPT2_SMALL, planted_scores(GPT2_SMALL, 1, 60))


def curve_rows(graph, sizes):
  return [{"n_edges": n, "n_edges_kept": graph.top_n(n).count_edges(), "percentage": 100 * n /
           graph.n_edges, "metric": 0.1 * i, "faithfulness": min(1.0, np.log1p(n) / 5)}
          for i, n in enumerate(sizes)]


def page_json(html: str) -> dict:
  m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', html, re.S)
  return json.loads(m.group(1).replace("<\\/", "</").replace("<\\!--", "<!--"))


# ------------------------------------------------------------------------------------ Python side


@pytest.mark.parametrize("shape", [GraphShape(2, 3), GraphShape(3, 2, True), GraphShape(1, 1)])
def test_entry_sizes_equal_top_n_for_every_size(shape):
  g0 = Graph.from_config(shape)
  rng = np.random.default_rng(3)
  for scores in (rng.normal(size=g0.valid.shape) * (rng.random(g0.valid.shape) < 0.6),  # 0 ties
                 np.round(rng.normal(size=g0.valid.shape)),  # many ties
                 planted_scores(shape, 4, 3)):
    g = Graph.from_config(shape, scores)
    entry = viewer.entry_sizes(g)
    for n in range(g.n_edges + 1):
      assert np.array_equal(g.valid & (entry <= n), g.top_n(n).in_graph), n


def test_entry_sizes_gpt2_small(gpt2_graph):
  g = gpt2_graph
  assert (g.n_nodes, g.n_edges) == (158, 32491)
  entry = viewer.entry_sizes(g)
  sizes = [0, 1, 7, 30, 100, 500, 5000, g.n_edges] + [n for _, n in viewer.mib_sizes(g.n_edges)]
  for n in sizes:
    assert np.array_equal(g.valid & (entry <= n), g.top_n(n).in_graph), n
  assert g.top_n(30).count_edges() > 5  # the planted paths make small circuits non-empty


def test_page_data_lists_edges_as_prefixes(small_graph):
  g = small_graph
  d = viewer.page_data(g, n=12)
  e = d["edges"]
  assert len(e["s"]) == g.n_edges and d["n"] == 12 and d["n_total"] == g.n_edges
  assert list(e["entry"]) == sorted(e["entry"])
  for n in (0, 3, 12, 40, g.n_edges):
    k = int(np.searchsorted(e["entry"], n, side="right"))
    names = {f"{d['nodes'][s]}->{d['receiver_names'][r]}" for s, r in
             zip(e["s"][:k], e["r"][:k], strict=True)}
    c = g.top_n(n)
    assert names == {c.edge_name(int(s), int(r)) for s, r in
                     zip(*np.nonzero(c.in_graph), strict=True)}
  ranked = [name for name, _ in g.ranked_edges()]
  for i in range(0, g.n_edges, 7):
    name = f"{d['nodes'][e['s'][i]]}->{d['receiver_names'][e['r'][i]]}"
    assert ranked[e["rank"][i] - 1] == name
    assert e["score"][i] == g.scores[g.edge_index(name)]
  assert [p for p, _ in d["mib"]] == list(MIB_PERCENTAGES)
  assert [n for _, n in d["mib"]] == [n_edges_at_percentage(p, g.n_edges) for p in MIB_PERCENTAGES]


def test_initial_size_defaults(small_graph):
  g = small_graph
  assert viewer.page_data(g)["n"] == n_edges_at_percentage(1.0, g.n_edges)  # empty circuit
  assert viewer.page_data(g.top_n(20))["n"] == g.top_n(20).count_edges()
  assert viewer.page_data(g.replace(meta={"top_n": 20}))["n"] == 20
  with pytest.raises(viewer.ViewerError, match="initial circuit size"):
    viewer.page_data(g, n=g.n_edges + 1)


def test_html_is_self_contained(small_graph):
  html = viewer.render_html(small_graph, curve=curve_rows(small_graph, [0, 5, 20, 100]),
                            title="a <b>&\"title</script>")
  low = html.lower()
  for bad in ("http://", "https://", "<script src", "<link", "@import", "url(", "src=", "//cdn",
              "fetch(", "xmlhttprequest", "/*__"):
    assert bad not in low, bad
  assert low.count("<script") == 2  # the data and the inlined viewer, nothing else
  assert "</script><" not in html.split("<body>")[1].split('id="viewer-data">')[0]
  d = page_json(html)
  assert d["title"] == 'a <b>&"title</script>' and d["curve"]["n"] == [0, 5, 20, 100]
  assert "<title>a &lt;b&gt;&amp;&quot;title&lt;/script&gt;</title>" in html


def test_scores_are_shipped_exactly(small_graph):
  d = page_json(viewer.render_html(small_graph))
  got = np.asarray(d["edges"]["score"], np.float32)
  want = small_graph.scores[np.asarray(d["edges"]["s"]), np.asarray(d["edges"]["r"])]
  assert np.array_equal(got, want)


def test_curve_csv(tmp_path, small_graph):
  path = tmp_path / "faithfulness.csv"
  path.write_text("n_edges,n_edges_kept,percentage,metric,faithfulness\n0,0,0.0,-0.25,0.0\n"
                  "20,19,12.5,9.9,0.85\n5,3,3.1,0.2,0.1\n")
  rows = viewer.read_curve(path)
  assert rows[1] == {"n_edges": 20, "n_edges_kept": 19, "percentage": 12.5, "metric": 9.9,
                     "faithfulness": 0.85}
  d = viewer.page_data(small_graph, curve=path)
  assert d["curve"]["n"] == [0, 5, 20] and d["curve"]["faithfulness"] == [0.0, 0.1, 0.85]
  bad = {"nofaith.csv": ("n_edges,metric\n1,2\n", "needs the column"),
         "text.csv": ("n_edges,faithfulness\n1,high\n", "line 2"),
         "big.csv": (f"n_edges,faithfulness\n{small_graph.n_edges + 1},1\n", "not an edge count"),
         "frac.csv": ("n_edges,faithfulness\n2.5,1\n", "not an edge count"),
         "nan.csv": ("n_edges,faithfulness\n2,nan\n", "not finite")}
  for name, (text, message) in bad.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(viewer.ViewerError, match=message) as e:
      viewer.page_data(small_graph, curve=tmp_path / name)
    assert name in str(e.value)
  with pytest.raises(viewer.ViewerError, match="cannot read"):
    viewer.read_curve(tmp_path / "absent.csv")


def test_baselines_from_curve_or_meta(small_graph):
  class Curve:
    m_full, m_empty = 2.0, -1.0

    def rows(self):
      return [{"n_edges": 3, "faithfulness": 0.5}]

  assert viewer.page_data(small_graph, curve=Curve())["baselines"] == {"full": 2.0, "empty": -1.0}
  g = small_graph.replace(meta={"m_full": 3.0, "m_empty": 0.5})
  assert viewer.page_data(g)["baselines"] == {"full": 3.0, "empty": 0.5}
  assert viewer.page_data(small_graph)["baselines"] == {"full": None, "empty": None}


def test_write_html_atomic_and_nothing_on_error(tmp_path, small_graph):
  path = tmp_path / "circuit.html"
  path.write_text("old")
  viewer.write_html(small_graph, path, title="t")
  assert path.read_text().startswith("<!DOCTYPE html>")
  with pytest.raises(viewer.ViewerError):
    viewer.write_html(small_graph, tmp_path / "other.html", curve=[{"n_edges": -1,
                                                                    "faithfulness": 0}])
  assert sorted(os.listdir(tmp_path)) == ["circuit.html"]
  with pytest.raises(viewer.ViewerError, match="cannot write"):
    viewer.write_html(small_graph, tmp_path / "no" / "dir.html")


# ----------------------------------------------------------------------------------- the binary


def _eap_ig_json(graph: Graph, old_nodes: bool) -> dict:
  """The JSON as the PyTorch EAP-IG / MIB write it: no meta; old files have {node: bool}."""
  d = graph.to_dict()
  d.pop("meta", None)
  if old_nodes:
    d["nodes"] = {k: v["in_graph"] for k, v in d["nodes"].items()}
  return d


def test_view_page_reads_eap_ig_formats(tmp_path, small_graph):
  for old in (False, True):
    src = tmp_path / f"g{old}.json"
    src.write_text(json.dumps(_eap_ig_json(small_graph.top_n(10), old)))
    out = page.write_page(page.ViewConfig(graph=str(src), out=str(tmp_path / f"g{old}.html")))
    d = page_json(open(out).read())
    assert d["n_total"] == small_graph.n_edges and d["title"] == src.name
    assert d["n"] == small_graph.top_n(10).count_edges()
  # Our own graph.json with meta: the title names the method and task; the default --out.
  ours = tmp_path / "run" / "graph.json"
  ours.parent.mkdir()
  small_graph.top_n(10).to_json(ours, meta={"method": "EAP", "task": "ioi", "top_n": 10})
  out = page.write_page(page.ViewConfig(graph=str(ours)))
  assert out == str(tmp_path / "run" / "circuit.html")
  d = page_json(open(out).read())
  assert d["title"] == "EAP on ioi" and d["n"] == 10


def test_view_page_errors_name_the_flag(tmp_path, small_graph):
  good = tmp_path / "graph.json"
  small_graph.to_json(good)
  (tmp_path / "bad.json").write_text('{"cfg": ')
  (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
  cases = [(dict(graph=None), "--graph is required"),
           (dict(graph=str(tmp_path / "absent.json")), "--graph=.*no such file"),
           (dict(graph=str(tmp_path / "bad.json")), "--graph: .*bad.json is not valid JSON"),
           (dict(graph=str(good), curve=str(tmp_path / "x.csv")), "--curve=.*no such"),
           (dict(graph=str(good), curve=str(tmp_path / "bad.csv")), "--curve: .*bad.csv"),
           (dict(graph=str(good), n=10 ** 6), "--n=1000000"),
           (dict(graph=str(good), max_drawn=0), "--max_drawn=0"),
           (dict(graph=str(good), out=str(tmp_path / "no" / "x.html")), "--out=.*directory"),
           (dict(graph=str(good), out=str(tmp_path)), "--out=.*is a directory")]
  for kwargs, message in cases:
    kwargs.setdefault("out", str(tmp_path / "out.html"))
    with pytest.raises(inputs.InputError, match=message):
      page.write_page(page.ViewConfig(**kwargs))
  assert not (tmp_path / "out.html").exists()


def _run_view(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.view", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the binary in a subprocess (about 7 s)
def test_view_binary(tmp_path, small_graph):
  graph, curve, out = tmp_path / "graph.json", tmp_path / "f.csv", tmp_path / "c.html"
  small_graph.to_json(graph)
  curve.write_text("n_edges,faithfulness\n0,0\n10,0.5\n" + f"{small_graph.n_edges},1\n")
  r = _run_view(f"--graph={graph}", f"--curve={curve}", f"--out={out}", "--n=10")
  assert r.returncode == 0, r.stderr
  assert page_json(out.read_text())["curve"]["n"] == [0, 10, small_graph.n_edges]
  bad = _run_view(f"--graph={curve}", f"--out={tmp_path / 'x.html'}")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and "--graph" in lines[0] and "f.csv" in lines[0], bad.stderr
  assert not (tmp_path / "x.html").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  h = _run_view("--help")
  assert h.returncode == 0
  for flag in ("--graph", "--curve", "--out", "--title", "--n", "--max_drawn"):
    assert flag + ":" in h.stdout, flag


# --------------------------------------------------------------------------------- in a browser


def _drawn(driver):
  return driver.execute_script(
      "const g = document.getElementById('edges');"
      " return [+document.getElementById('size-n').value,"
      " g.querySelectorAll('path').length, +g.dataset.count, +g.dataset.n];")


def _pressed(driver, *keys):
  from selenium.webdriver.common.action_chains import ActionChains
  ActionChains(driver).send_keys(*keys).perform()
  driver.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]))")
  return _drawn(driver)


@pytest.fixture(scope="module")
def small_page(tmp_path_factory, small_graph):
  path = tmp_path_factory.mktemp("viewer") / "circuit.html"
  sizes = [0, 5, 12, 30, 100, small_graph.n_edges]
  viewer.write_html(small_graph, path, curve=curve_rows(small_graph, sizes), title="small", n=12)
  return path


def test_page_sizes_match_selection(browser, small_page, small_graph):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  d, g = browser, small_graph
  open_page(d, small_page)
  n, drawn, count, _ = _drawn(d)
  assert n == 12 and drawn == count == g.top_n(12).count_edges()
  seen = set()
  # The slider, moved with the keyboard as a user would.
  d.find_element(By.ID, "size-slider").click()
  for keys in ([Keys.HOME], [Keys.PAGE_UP] * 3, [Keys.ARROW_RIGHT] * 40, [Keys.PAGE_UP] * 2,
               [Keys.ARROW_LEFT] * 25, [Keys.END]):
    n, drawn, count, shown_n = _pressed(d, *keys)
    assert drawn == count == g.top_n(n).count_edges() and shown_n == n, (keys, n)
    seen.add(n)
  assert n == g.n_edges and len(seen) >= 5
  # The number input, typed.
  box = d.find_element(By.ID, "size-n")
  for n in (3, 17, 58, 0, g.n_edges - 1):
    box.clear()
    box.send_keys(str(n), Keys.ENTER)
    assert _drawn(d)[:3] == [n, g.top_n(n).count_edges(), g.top_n(n).count_edges()], n
  # MIB's percentages, as buttons.
  for button in d.find_elements(By.CSS_SELECTOR, "#mib-row button"):
    button.click()
    n, drawn, count, _ = _drawn(d)
    p = float(button.text.rstrip("%"))
    assert n == n_edges_at_percentage(p, g.n_edges) and drawn == g.top_n(n).count_edges(), p
  # The percentage input: 25% of the edges.
  pct = d.find_element(By.ID, "size-pct")
  pct.clear()
  pct.send_keys("25", Keys.ENTER)
  n = n_edges_at_percentage(25.0, g.n_edges)
  assert _drawn(d)[:2] == [n, g.top_n(n).count_edges()]
  readout = d.find_element(By.ID, "faith-readout").text
  d.execute_script("circuitViewer.setSize(30)")
  assert "n = 30: " + f"{min(1.0, np.log1p(30) / 5):.3f}" in d.find_element(By.ID,
                                                                             "faith-readout").text
  assert "not measured" in readout


def test_hover_shows_the_edge_score(browser, small_page, small_graph):
  from selenium.webdriver.common.actions.action_builder import ActionBuilder
  from selenium.webdriver.common.by import By
  d, g = browser, small_graph
  open_page(d, small_page)
  d.execute_script("circuitViewer.setSize(40)")
  n_paths = d.execute_script("return document.querySelectorAll('#edges path').length")
  checked = 0
  for j in range(n_paths - 1, -1, -1):  # strongest (drawn last) first
    if checked == 5:
      break
    # A point on the edge's stroke, in viewport pixels; whichever edge is on top there is hovered.
    x, y, top = d.execute_script("""
      const p = document.querySelectorAll('#edges path')[arguments[0]];
      const q = p.getPointAtLength(p.getTotalLength() * 0.4).matrixTransform(p.getScreenCTM());
      const hit = document.elementFromPoint(q.x, q.y);
      return [q.x, q.y, hit && hit.dataset.i !== undefined ? +hit.dataset.i : -1];""", j)
    if top < 0:  # a node covers that point
      continue
    action = ActionBuilder(d)
    action.pointer_action.move_to_location(int(round(x)), int(round(y)))
    action.perform()
    tip = d.find_element(By.ID, "tooltip")
    assert tip.is_displayed()
    name = tip.find_element(By.CLASS_NAME, "tip-name").text
    score = float(tip.find_element(By.CLASS_NAME, "tip-score").text)
    rank = int(tip.find_element(By.CLASS_NAME, "tip-rank").text)
    assert np.float32(score) == g.scores[g.edge_index(name)], name
    assert [e for e, _ in g.ranked_edges()][rank - 1] == name
    assert g.top_n(40).in_graph[g.edge_index(name)]
    checked += 1
  assert checked == 5


def test_click_node_lists_its_edges(browser, small_page, small_graph):
  from selenium.webdriver.common.by import By
  d, g = browser, small_graph
  open_page(d, small_page)
  d.execute_script("circuitViewer.setSize(40)")
  c = g.top_n(40)
  node = int(np.argmax(c.in_graph.sum(axis=1)[1:])) + 1  # the busiest sender after the input
  name = g.sender_names[node]
  d.find_element(By.CSS_SELECTOR, f'.node[data-node="{node}"]').click()
  assert d.find_element(By.ID, "node-title").text == name
  rows_in = d.find_elements(By.CSS_SELECTOR, "#node-info .incoming tr")
  rows_out = d.find_elements(By.CSS_SELECTOR, "#node-info .outgoing tr")
  want_out = {g.edge_name(node, int(r)) for r in np.flatnonzero(c.in_graph[node])}
  want_in = {g.edge_name(int(s), int(r)) for r in g.layout.receivers_of[node]
             for s in np.flatnonzero(c.in_graph[:, r])}
  assert {r.find_element(By.TAG_NAME, "td").text for r in rows_out} == want_out
  assert {r.find_element(By.TAG_NAME, "td").text for r in rows_in} == want_in


def test_screenshot_is_not_blank(browser, small_page, tmp_path):
  import matplotlib.pyplot as plt
  d = browser
  open_page(d, small_page)
  png = d.get_screenshot_as_png()
  img = plt.imread(io.BytesIO(png), format="png")[..., :3]
  assert img.shape[0] > 500 and img.shape[1] > 1000
  assert img.std() > 0.05
  not_white = (img < 0.9).any(axis=-1).mean()
  assert not_white > 0.03, not_white
  blue, red = np.array([0x1f, 0x5f, 0xb4]) / 255, np.array([0xc4, 0x30, 0x2b]) / 255

  def near(c):
    return (np.abs(img - c).max(axis=-1) < 0.12).sum()

  assert near(blue) + near(red) > 50  # edges are drawn, in their sign colours


def test_gpt2_small_page_responds_quickly(browser, tmp_path, gpt2_graph):
  d, g = browser, gpt2_graph
  path = tmp_path / "gpt2.html"
  t0 = time.perf_counter()
  viewer.write_html(g, path, title="GPT-2 small, planted scores", n=100)
  t_write = time.perf_counter() - t0
  t0 = time.perf_counter()
  open_page(d, path)
  t_load = time.perf_counter() - t0
  timings = {}
  for n in (100, 500, 3249, 10000, g.n_edges, 30):
    # The slider's input event as a drag fires it; timed until the frame after the redraw.
    ms, count, drawn = d.execute_async_script("""
      const done = arguments[arguments.length - 1], s = document.getElementById('size-slider');
      const t0 = performance.now();
      s.value = arguments[0];
      s.dispatchEvent(new Event('input'));
      requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(() => {
        const e = document.getElementById('edges');
        done([performance.now() - t0, +e.dataset.count, e.querySelectorAll('path').length]);
      }, 0)));""", round(1000 * np.log1p(n) / np.log1p(g.n_edges)))
    shown = int(d.execute_script("return document.getElementById('size-n').value"))
    want = g.top_n(shown).count_edges()
    assert count == want and drawn == min(want, viewer.MAX_DRAWN), shown
    timings[shown] = ms / 1000
  worst = max(timings.values())
  print(f"\nGPT-2 small page: written in {t_write:.2f} s, {os.path.getsize(path) / 1e6:.2f} MB, "
        f"opened in {t_load:.2f} s; slider response (s) by size: "
        + ", ".join(f"{n}: {t:.3f}" for n, t in timings.items()))
  assert t_load < 5 and worst < 5  # the target is 1 s; slack for a loaded 2-core CI machine


def test_edge_case_pages_load(browser, tmp_path):
  """One head, a parallel-block model, all-zero scores, no curve or a one-point curve: no errors."""
  d = browser
  cases = [(GraphShape(1, 1), "random", None), (GraphShape(2, 2, True), "random", [1.0]),
           (GraphShape(2, 3), "zeros", [])]
  for k, (shape, kind, curve) in enumerate(cases):
    g = Graph.from_config(shape, np.zeros(Graph.from_config(shape).valid.shape) if kind == "zeros"
                          else planted_scores(shape, k, 2))
    rows = None if curve is None else [{"n_edges": 1, "faithfulness": f} for f in curve]
    path = tmp_path / f"case{k}.html"
    viewer.write_html(g, path, curve=rows, n=0)
    open_page(d, path)
    for n in (0, 1, g.n_edges // 2, g.n_edges):
      d.execute_script("circuitViewer.setSize(arguments[0])", n)
      assert _drawn(d)[:3] == [n, g.top_n(n).count_edges(), g.top_n(n).count_edges()]
    d.find_element("css selector", '.node[data-node="0"]').click()
    errors = [m for m in d.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
    assert not errors, (shape, errors)
