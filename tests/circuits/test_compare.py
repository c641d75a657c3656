"""`circuits.compare` and `experiments.compare_circuits`: top-k overlap, Spearman of |score| and IoU
at matched sizes, read back from the CSV; the binary's outputs and one-line errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from jaxinterp import models
from jaxinterp.circuits import Graph, GraphError, compare, mib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=40, n_ctx=32)


def _graph(seed: int, meta: dict | None = None) -> Graph:
  g = Graph.from_config(CFG)
  scores = np.random.default_rng(seed).normal(size=g.scores.shape).astype(np.float32)
  return Graph.from_config(CFG, scores).replace(meta=meta or {})


def test_average_ranks_and_spearman_match_scipy():
  x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0])
  y = np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0, 8.0])
  np.testing.assert_array_equal(compare.average_ranks(x), scipy.stats.rankdata(x))
  assert compare.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
  assert np.isnan(compare.spearman(np.ones(5), x[:5]))


def test_compare_against_definitions():
  a, b = _graph(0), _graph(1)
  same = compare.compare(a, a, ks=(5, 10, 10_000))
  n = int(a.valid.sum())
  assert same.ks == (5, 10, n)  # a size above the edges becomes all of them
  assert same.spearman == pytest.approx(1.0)
  assert same.top_k_overlap == same.edge_iou == same.node_iou == (1.0, 1.0, 1.0)
  # Negated scores rank the same by |score|.
  neg = compare.compare(a, a.replace(scores=-a.scores), ks=(5,))
  assert neg.spearman == pytest.approx(1.0) and neg.top_k_overlap == (1.0,)
  c = compare.compare(a, b, ks=(7, 20), labels=("a", "b"))
  valid = a.valid
  assert c.spearman == pytest.approx(
      scipy.stats.spearmanr(np.abs(a.scores[valid]), np.abs(b.scores[valid])).statistic)
  for i, k in enumerate(c.ks):
    top_a = set(np.argsort(-np.abs(np.where(valid, a.scores, 0)).ravel(), kind="stable")[:k])
    top_b = set(np.argsort(-np.abs(np.where(valid, b.scores, 0)).ravel(), kind="stable")[:k])
    assert c.top_k_overlap[i] == len(top_a & top_b) / k
    assert c.edge_iou[i] == mib.edge_iou(a.top_n(k), b.top_n(k))
    assert c.node_iou[i] == mib.node_iou(a.top_n(k), b.top_n(k))
    assert (c.edges_a[i], c.edges_b[i]) == (a.top_n(k).count_edges(), b.top_n(k).count_edges())
  other = Graph.from_config(models.ModelConfig(family="gpt2", d_model=16, n_layers=3, n_heads=2,
                                               d_head=8, d_mlp=32, d_vocab=40, n_ctx=32))
  with pytest.raises(GraphError, match="different models"):
    compare.compare(a, other)


def test_labels_name_the_method_else_the_directory():
  assert compare.labels_for(["x/g.json", "y/g.json"], [{"method": "EAP"}, {"method": "ACDC"}]) \
      == ["EAP", "ACDC"]
  assert compare.labels_for(["r1/g.json", "r2/g.json"], [{"method": "EAP"}, {"method": "EAP"}]) \
      == ["r1", "r2"]
  assert compare.labels_for(["x/g.json", "y/g.json"],
                            [{"method": "EAP", "task": "ioi"}, {"method": "EAP", "task": "sva"}]) \
      == ["EAP (ioi)", "EAP (sva)"]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.compare_circuits", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_binary_writes_csv_and_png_and_refuses_bad_input(tmp_path):
  paths = []
  for i, method in enumerate(("EAP", "EAP-IG-inputs", "ACDC")):
    (tmp_path / method).mkdir()
    paths.append(str(tmp_path / method / "graph.json"))
    _graph(i).to_json(paths[-1], meta={"method": method, "task": "ioi"})
  out = tmp_path / "cmp"
  r = _run(*paths, "--k=5,20", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "EAP vs EAP-IG-inputs: Spearman of |score|" in r.stdout
  rows = list(csv.DictReader(open(out / "comparison.csv")))
  assert len(rows) == 3 * 2  # three pairs, two sizes
  first = compare.compare(_graph(0), _graph(1), ks=(5, 20))
  assert float(rows[0]["spearman_abs"]) == pytest.approx(first.spearman)
  assert [float(r["top_k_overlap"]) for r in rows[:2]] == list(first.top_k_overlap)
  assert [float(r["edge_iou"]) for r in rows[:2]] == list(first.edge_iou)
  assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "DONE").read_text().split() == ["run.json", "comparison.csv", "comparison.png"]
  malformed = tmp_path / "malformed.json"
  malformed.write_text('{"nodes": 3}')
  for args, needle in [((paths[0],), "at least two"), ((paths[0], str(tmp_path / "no.json")),
                                                       "no.json: no such file"),
                       ((*paths[:2], "--k=0"), "--k=0"),
                       ((paths[0], str(malformed)), f"{malformed}: graph JSON lacks")]:
    bad = _run(*args, f"--out={tmp_path / 'bad'}")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr
    assert lines[0].count(needle.split(":")[0]) == 1, lines[0]  # the file named once
  assert not (tmp_path / "bad").exists()
