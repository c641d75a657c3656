"""Position-level EAP against PEAP's own code (github.com/technion-cs-nlp/PEAP, Haklay et al. 2025,
`src/pos_aware_edge_attribution_patching.py`), run on the same random-init GPT-2 and IOI rows.

PEAP runs in a subprocess (`peap_driver.py`: TransformerLens, torch, pandas, no jax) with its
source on PYTHONPATH: $JAXINTERP_PEAP_SRC, by default ../PEAP/src beside the repository (a checkout
of the repository; it is not on PyPI). The tests skip without it, without TransformerLens 3.9 or
pandas, or without ../shared's GPT-2 tokenizer and EAP-IG IOI data.

The models are a random GPT-2 and a random Llama (grouped-query attention, rotary). The rows are
EAP-IG IOI rows whose IO name comes first (so the IOI schema's spans are contiguous in
the schema's order, as PEAP's span columns require) and whose corrupted prompt has the clean
prompt's token length (PEAP patches position by position). Their spans are `circuits.schemas.
ioi_schema`'s, handed to PEAP as its span columns.

What is checked, under counterfactual (patching) and zero ablation (PEAP's zero ablation zeroes the
whole input node: our `zero-all`): for every non-crossing edge PEAP scores (EAP-IG's edges, every
one), its per-span `sum`, `avg` and `max_abs` scores and its whole-prompt scores, averaged over
rows, against `attribution.positions.attribute_position_rows(..., "EAP")` aggregated by
`circuits.schemas.aggregate_row`:
- into an MLP, a head's q input or the logits: our non-crossing span edges (`sum`, `mean`; PEAP's
  `max_abs` is the largest |score| in the span, ours keeps its sign, so |ours| is compared);
- into a head's k or v input: PEAP scores the key position's input, summed over every query that
  reads it, where ours are crossing edges (key j, query i >= j); summed over the query spans they
  are PEAP's `sum`. Its `avg` and `max_abs` are compared with the key positions' totals.
PEAP's crossing edges are another quantity (a head's own k or v at a key span patched, read at
the head's output in a query span; docs/methods.md) and are not compared.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.attribution import positions as P
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import schemas
from jaxinterp.circuits.layout import layout_for, shape_key, valid_edges
from jaxinterp.tasks import csv_io
from jaxinterp.tasks.tokenization import encode
from tests.attribution.reference_checkpoint import write_random_gpt2

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
transformer_lens = pytest.importorskip("transformer_lens")
pytest.importorskip("pandas")

ROOT = pathlib.Path(__file__).resolve().parents[2]
PEAP_SRC = os.environ.get("JAXINTERP_PEAP_SRC", str(ROOT.parent / "PEAP" / "src"))
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
IOI = SHARED / "data" / "eap-ig" / "ioi" / "gpt2.csv"
DRIVER = pathlib.Path(__file__).with_name("peap_driver.py")
N = 6  # rows (PEAP scores one row at a time)
ABLATIONS = {"counterfactual": "patching", "zero": "zero-all"}  # PEAP's name: ours
SCHEMA = schemas.ioi_schema()


def _have_peap() -> bool:
  if not os.path.isfile(os.path.join(PEAP_SRC, "pos_aware_edge_attribution_patching.py")):
    return False
  r = subprocess.run([sys.executable, "-c", "import pos_aware_edge_attribution_patching"],
                     capture_output=True, env=dict(os.environ, PYTHONPATH=PEAP_SRC))
  return r.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TOKENIZER.is_dir() and IOI.exists()),
                       reason="../shared's gpt2-tokenizer or EAP-IG IOI data is absent"),
    pytest.mark.skipif(not _have_peap(), reason=f"PEAP is not at {PEAP_SRC} (a checkout of "
                       "github.com/technion-cs-nlp/PEAP; set $JAXINTERP_PEAP_SRC to its src/)"),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def rows(request, tmp_path_factory):
  """(the checkpoint's model, the chosen IOI rows as a dataset, their spans, the work folder), for
  a random GPT-2 and a random Llama (GQA, rotary)."""
  base = tmp_path_factory.mktemp("peap")
  ckpt = write_random_gpt2(base / "model", TOKENIZER, request.param)
  model = models.from_pretrained(str(ckpt))
  with open(IOI, newline="") as f:
    source = list(csv.DictReader(f))[:60]
  probe = csv_io.load_task("ioi", IOI, model.tokenizer, n_examples=len(source))
  spans = schemas.dataset_spans(SCHEMA, probe)
  keep = []
  for r, row in enumerate(source):
    clean, corrupted = encode(model.tokenizer, [row["clean"], row["corrupted"]])
    in_order = np.array_equal(spans[r, 1:, 0], spans[r, :-1, 1])
    if in_order and len(clean) == len(corrupted):
      keep.append(r)
  assert len(keep) >= N
  keep = keep[:N]
  chosen = base / "ioi.csv"
  with open(chosen, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(source[0]))
    w.writeheader()
    w.writerows(source[r] for r in keep)
  ds = csv_io.load_task("ioi", chosen, model.tokenizer)
  assert len(ds) == N and ds.fitted == 0
  spans = schemas.dataset_spans(SCHEMA, ds)
  np.testing.assert_array_equal(spans, schemas.dataset_spans(SCHEMA, probe)[keep])
  for name, text in (("clean", "clean"), ("counter", "corrupted")):
    with open(base / f"{name}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["prompt", *SCHEMA.names, "length", "correct_id", "incorrect_id"])
      for r, i in enumerate(keep):
        w.writerow([source[i][text], *spans[r, :, 0], spans[r, -1, 1],
                    source[i]["correct_idx"], source[i]["incorrect_idx"]])
  return model, ds, spans, base


def _peap(base: pathlib.Path, ablation: str) -> dict:
  """PEAP's non-crossing edges for `ablation`, run by `peap_driver.py`."""
  work = base / ablation
  work.mkdir()
  spec = {"checkpoint": str(base / "model"), "clean": str(base / "clean.csv"),
          "counter": str(base / "counter.csv"), "spans": [*SCHEMA.names, "length"],
          "ablation": ablation}
  (work / "spec.json").write_text(json.dumps(spec))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([PEAP_SRC, str(ROOT)]),
             CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TRANSFORMERS_VERBOSITY="error")
  r = subprocess.run([sys.executable, str(DRIVER), str(work / "spec.json")], env=env,
                     capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads((work / "peap.json").read_text())


def _ours(model, ds, spans, intervention) -> dict:
  """Per span (then the whole prompt), averaged over rows, for every edge [sender, receiver]:
  `sum`, `avg` and `max_abs` as PEAP defines them, from our position scores."""
  kv = cpos.kv_receivers(model.cfg)
  out = {k: 0.0 for k in ("sum", "avg", "max_abs")}
  rows = list(P.attribute_position_rows(model.cfg, model.params, ds, "EAP",
                                        intervention=intervention, quiet=True))
  for r, scores in enumerate(rows):
    sp, length = spans[r], int(ds.lengths[r])
    width = np.maximum(sp[:, 1] - sp[:, 0], 1)[:, None, None]
    local_sum, crossing_sum = schemas.aggregate_row(scores, sp, "sum")
    local_mean, _ = schemas.aggregate_row(scores, sp, "mean")
    local_max, _ = schemas.aggregate_row(scores, sp, "max_abs")
    # PEAP's unit at every position: a k/v input is the key position's, every query reading it
    # summed; the other receivers are our non-crossing edges
    _, key = cpos.pairs(scores.n_pos)
    per_key = np.zeros((scores.n_pos,) + scores.crossing.shape[1:])
    np.add.at(per_key, key, scores.crossing)
    per_pos = scores.local.astype(np.float64)
    per_pos[:, :, kv] = per_key
    span_sum = local_sum.copy()
    span_sum[:, :, kv] = crossing_sum.sum(1)  # over every query span
    span_avg = local_mean.copy()
    span_avg[:, :, kv] = span_sum[:, :, kv] / width
    span_max = np.abs(local_max)
    for k, (a, b) in enumerate(sp):
      span_max[k][:, kv] = np.abs(per_pos[a:b][:, :, kv]).max(0) if b > a else 0.0
    whole = span_sum.sum(0, keepdims=True)
    row = {"sum": np.concatenate([span_sum, whole]),
           "avg": np.concatenate([span_avg, whole / length]),
           "max_abs": np.concatenate([span_max, np.abs(per_pos[:length]).max(0, keepdims=True)])}
    for k in out:
      out[k] = out[k] + row[k] / len(rows)
  return out


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_non_crossing_edges_equal_peap(rows, ablation):
  model, ds, spans, base = rows
  theirs = _peap(base, ablation)
  assert theirs["n_rows"] == N
  ours = _ours(model, ds, spans, ABLATIONS[ablation])
  lay = layout_for(shape_key(model.cfg))
  valid = valid_edges(model.cfg)
  names = {lay.edge_name(s, r) for s, r in zip(*np.nonzero(valid), strict=True)}
  assert set(theirs["edges"]) == names  # PEAP scores EAP-IG's edges, every one
  for stat in ("sum", "avg", "max_abs"):
    want = np.zeros_like(ours[stat])
    for name, value in theirs["edges"].items():
      s, r = lay.edge_index(name)
      want[:, s, r] = value[stat]
    got = np.where(valid[None], ours[stat], 0.0)
    scale = np.abs(want).max()
    assert scale > 0, stat
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-4, err_msg=stat)
