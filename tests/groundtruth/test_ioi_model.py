"""The project-trained IOI model: prompt generation (fast) and, by hand, training it and running the
span-level IOI circuit on it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxinterp.groundtruth import ioi_model
from jaxinterp.runtime import inputs
from jaxinterp.tasks.tokenization import as_tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
CSV = os.path.join(SHARED, "data", "eap-ig", "ioi", "gpt2.csv")
TOKENIZER = os.path.join(SHARED, "models", "gpt2-tokenizer")
needs_data = pytest.mark.skipif(not (os.path.exists(CSV) and os.path.isdir(TOKENIZER)),
                                reason="needs ../shared's IOI CSV and GPT-2 tokenizer")


@needs_data
def test_prompts_are_deterministic_held_out_and_in_the_csv_format():
  tok = as_tokenizer(TOKENIZER)
  rows = ioi_model.read_rows(CSV)[:40]
  templates, names = ioi_model.csv_templates(rows, tok)
  assert all(t.count("{A}") == 1 and t.count("{B}") == 2 for t in templates)
  held = {r["clean"] for r in rows}
  a = ioi_model.ioi_prompts(templates, names, tok, 50, seed=3, exclude=held)
  assert a == ioi_model.ioi_prompts(templates, names, tok, 50, seed=3, exclude=held)
  assert a != ioi_model.ioi_prompts(templates, names, tok, 50, seed=4, exclude=held)
  for r in a:
    assert set(r) == set(ioi_model.COLUMNS) and r["clean"] not in held
    io, s = (tok.decode([r[k]]) for k in ("correct_idx", "incorrect_idx"))
    assert r["clean"].count(io) == 1 and r["clean"].count(s) == 2  # " IO" once, " S" twice
    # The corrupted prompt replaces S2 alone by a third name, keeping the token count.
    head, _, tail = r["clean"].rpartition(s)
    assert r["corrupted"].startswith(head) and r["corrupted"].endswith(tail)
    assert r["corrupted"].count(s) == 1 and r["corrupted"].count(io) == 1
    assert len(tok.encode(r["clean"]).ids) == len(tok.encode(r["corrupted"]).ids)
  # The CSV's own rows are templates filled with their own names.
  r0 = rows[0]
  io, s = (tok.decode([int(r0[k])]).strip() for k in ("correct_idx", "incorrect_idx"))
  assert any(t.format(A=io, B=s) == r0["clean"] for t in templates)
  bad = [dict(rows[0], corrupted=rows[0]["clean"].replace(" and ", " or "))]
  with pytest.raises(inputs.InputError, match="row 2: the corrupted prompt"):
    ioi_model.csv_templates(bad, tok)


@needs_data
@pytest.mark.slow
@pytest.mark.by_hand  # trains the model (~1-2 minutes on 2 busy cores), then a span-level run
def test_trained_model_does_ioi_and_its_span_circuit_runs_through_s2_to_end(tmp_path):
  from jaxinterp import discovery, models
  from jaxinterp.circuits import schemas

  model_dir = str(tmp_path / "ioi_model")
  meta = ioi_model.train_ioi_model(ioi_model.IOITrainConfig(data=CSV, tokenizer=TOKENIZER),
                                   model_dir)
  held = meta["held_out"]
  assert held["n"] == 1000
  assert held["accuracy"] >= 0.95 and held["mean_logit_diff"] >= 4.0
  assert abs(held["mean_corrupted_logit_diff"]) < 0.1 * held["mean_logit_diff"]

  # The mechanism: a layer-0 head at S2 attends to the first clause's other name (IO), and the
  # layer-1 heads at the end attend to S2, reading IO from there.
  model = models.from_pretrained(model_dir)
  data = ioi_model._dataset(ioi_model.read_rows(CSV)[:100], model.tokenizer, CSV)
  schema = schemas.get_schema("ioi")
  spans = schemas.dataset_spans(schema, data)[:, :, 0]  # [row, span] first position
  col = {name: spans[:, schema.names.index(name)] for name in ("io", "s1", "s2", "end")}
  sites = ("blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern")
  _, cache = models.forward(model.cfg, model.params, data.clean, collect=sites)
  rows = np.arange(len(data.lengths))
  p0, p1 = (np.asarray(cache[s]) for s in sites)  # [row, head, query, key]
  assert p0[rows, :, col["s2"], col["io"]].mean(0).max() > 0.7
  assert (p0[rows, :, col["s2"], col["io"]] > p0[rows, :, col["s2"], col["s1"]]).mean() > 0.9
  assert p1[rows, :, col["end"], col["s2"]].mean(0).max() > 0.9

  out = str(tmp_path / "span")
  config = discovery.FindCircuitConfig(
      model=model_dir, task="ioi", data=CSV, n_examples=100, batch_size=25, schema="ioi",
      top_n=20, options={"level": "position"})
  discovery.find_circuit(config, out)
  with open(os.path.join(out, "graph.json")) as f:
    graph = json.load(f)
  names = list(graph["edges"])
  assert len(names) == 20
  # The highest-scoring edge into the logits is a layer-1 head's output at the end position.
  into_logits = [n for n in names if n.endswith("->logits@end")]
  assert into_logits and into_logits[0].startswith("a1.") and "@end->" in into_logits[0]
  # EAP-IG's corruption changes S2 alone, so every difference starts at S2: the top edges are
  # S2's token into the layer-0 queries at S2, and layer 0 at S2 into layer 1's values at the end.
  assert any(n.startswith("input@s2->a0.") and n.endswith("<q>@s2") for n in names[:5])
  assert any(n.startswith("a0.") and "@s2->a1." in n and n.endswith("<v>@end") for n in names)
  assert {n.split("->")[0].split("@")[1] for n in names} <= {"s2", "action", "end"}
  faith = graph["meta"]["faithfulness"]
  assert 0.8 <= faith <= 1.3
