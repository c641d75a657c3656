"""The attribution-graph run (`experiments/attribution_graph.py`'s library call) on a small saved
model and transcoder set: its files, and one-line refusals that leave no output directory."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.runtime import inputs
from jaxinterp.transcoders import toy
from jaxinterp.transcoders.pipeline import AttributionGraphConfig, attribution_graph

D, L, F = 16, 2, 24


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  base = tmp_path_factory.mktemp("pipeline")
  cfg = models.ModelConfig(family="gpt2", d_model=D, n_layers=L, n_heads=2, d_head=8, d_mlp=32,
                           d_vocab=40, n_ctx=12, bos_token_id=39)
  params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a,
                        models.init_params(cfg, jax.random.PRNGKey(0)))
  models.save_converted(models.Model(cfg, params), str(base / "model"))
  rng = np.random.default_rng(0)

  def a(*s, scale=0.5):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  for name, d in (("tc", D), ("tc_other", D + 8)):
    tc = T.PerLayerTranscoders(a(L, d, F, scale=d ** -0.5), a(L, F, scale=0.3) - 0.3, a(L, F, d),
                               a(L, d), scan=name)
    T.save_transcoder_set(tc, base / name)
  return base


def _config(base, **kw):
  return AttributionGraphConfig(**{**dict(model=str(base / "model"),
                                          transcoders=str(base / "tc" / "config.yaml"),
                                          prompt="3 17 22 8 3 17", batch_size=16), **kw})


def test_writes_graph_files(saved, tmp_path):
  out = str(tmp_path / "run")
  summary = attribution_graph(_config(saved, max_feature_nodes=12), out)
  assert sorted(os.listdir(out)) == ["DONE", "graph-metadata.json", "graph.html", "graph.json",
                                    "graph.npz"]
  g = T.load_npz(os.path.join(out, "graph.npz"))
  assert g.n_features == summary["features"] == 12 and g.input_tokens[0] == 39
  assert g.n_pos == 7 and set(summary["phase_seconds"]) >= {"load", "attribute", "write"}
  with open(os.path.join(out, "graph.json")) as fh:
    obj = json.load(fh)
  assert obj["metadata"]["scan"] == "tc" and obj["links"]
  assert obj["metadata"]["prompt_tokens"] == ["<bos>", "3", "17", "22", "8", "3", "17"]


@pytest.mark.parametrize("kw,match", [
    (dict(prompt="  "), "--prompt is empty"),
    (dict(prompt=" ".join(["5"] * 12)), "more than the model's context of 12"),
    (dict(prompt="a b"), "no tokenizer"),
    (dict(node_threshold=0.0), "node_threshold must be in"),
    (dict(edge_threshold=1.5), "edge_threshold must be in"),
    (dict(transcoders="OTHER"), "d_model 24, the model's is 16"),
    (dict(model="toy", transcoders=""), None),
])
def test_bad_input_is_one_line_and_leaves_no_directory(saved, tmp_path, kw, match):
  if kw.get("transcoders") == "OTHER":
    kw = {**kw, "transcoders": str(saved / "tc_other" / "config.yaml")}
  out = tmp_path / "run"
  if match is None:  # the toy with another model's transcoders
    kw, match = {"model": "toy", "transcoders": str(saved / "tc")}, "d_model 16, the model's"
  with pytest.raises((T.TranscoderError, inputs.InputError), match=match) as e:
    attribution_graph(_config(saved, **kw), str(out))
  assert "\n" not in str(e.value) and not out.exists()


def test_default_run_is_the_bundled_toy_mlp_with_live_features(tmp_path):
  """`python -m experiments.attribution_graph` with no flags: the bundled toy_mlp model and its
  transcoders, whose graph has active features and the induction answer as its top logit."""
  config = AttributionGraphConfig()
  out = str(tmp_path / "run")
  summary = attribution_graph(config, out)
  assert {"DONE", "graph.json", "graph.npz"} <= set(os.listdir(out))
  g = T.load_npz(os.path.join(out, "graph.npz"))
  assert summary["active_features"] == len(g.active_features) > 0 and g.n_features > 0
  prompt = [int(t) for t in config.prompt.split()]
  answer = prompt[prompt.index(prompt[-1]) + 1]  # the token after the last token's first copy
  assert int(g.logit_tokens[0]) == answer
  assert np.all(g.activation_values > 0) and {int(li) for li in g.active_features[:, 0]} == {0, 1}
  # the pruned graph keeps features at the default thresholds, and the viewer is written beside it
  with open(os.path.join(out, "graph.json")) as fh:
    pruned = json.load(fh)
  features = {n["node_id"] for n in pruned["nodes"]
              if n["feature_type"] == "cross layer transcoder"}
  assert features and all(any(e["source"] == f for e in pruned["links"]) for f in features)
  with open(os.path.join(out, "graph.html"), encoding="utf-8") as fh:
    page = fh.read()
  assert all(f'"id":"{f}"' in page for f in features) and "http" not in page.replace(
      "http://www.w3.org/2000/svg", "")


def test_bundled_toy_mlp_does_its_two_tasks_and_its_chain_graph_runs_through_features():
  """toy_mlp predicts a successor chain's next token (the MLPs' lookup) and an induction prompt's
  answer; on a chain prompt most of the logit's influence runs through transcoder features."""
  m = models.from_pretrained(toy.TOY_MLP_DIR)
  f = toy.successor()
  chain = [5]
  for _ in range(10):
    chain.append(int(f[chain[-1]]))
  tc = T.load(toy.TOY_TRANSCODERS_DIR, m.cfg)
  g = T.attribute_graph(m.cfg, m.params, tc, np.asarray([m.cfg.bos_token_id] + chain))
  assert [int(t) for t in g.logit_tokens] == [int(f[chain[-1]])]
  infl = T.pruning.node_influence(g.adjacency, g.logit_weights())
  assert infl[:g.n_features].sum() > 0.5 * g.logit_probabilities.sum()  # the weighted logits
  assert T.prune(g).node_mask[:g.n_features].sum() >= 3
