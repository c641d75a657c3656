"""The `methods` suite: every attribution method of the registry, timed on one shape and dataset.

    python -m benchmarks.run --suite=methods --shapes=gpt2-small --n=32 --out=results.json

Each case is one `attribution.attribute` call on the suite's data (the first --n IOI examples on a
GPT-2 shape), timed by `common.time_calls`: a first call (compile included, `first_call_s`) and
--repeats warm calls (`best_s`, `median_s`). A summary row per shape gives the ratios the issue
sets as targets (IFR against one EAP call, node-level EAP against edge-level EAP).

To add a method, add a row to CASES (a label and the keywords of `attribute`); methods that train
or search (`fit`) are timed the same way, whole.

Mask training is timed per step (`step_rows`): one UGS and one Edge-Pruning optimiser step on a
batch of the --n examples (one mask sample per example: --n rows), against one EAP batch of the same
--n examples (`score_batch`: the corrupted run, the clean run and the gradients); the issue's target
is a step at no more than 2x an EAP step. ACDC is timed whole on the bundled toy model (64 induction
examples), compile included, once per run (`acdc_toy_row`); the target is under a minute on CPU.
"""

from __future__ import annotations

import sys

import jax

from benchmarks import common
from jaxinterp import attribution as A
from jaxinterp.attribution import edge_pruning, ugs
from jaxinterp.groundtruth import toy

# (label, attribute() keywords). One row per timed call; `ig_steps` defaults to the suite's --steps.
CASES: list[tuple[str, dict]] = [
    ("EAP", dict(method="EAP")),
    ("EAP node", dict(method="EAP", level="node")),
    ("EAP neuron", dict(method="EAP", level="neuron")),
    ("EAP-IG-inputs", dict(method="EAP-IG-inputs")),
    ("EAP-IG-inputs node", dict(method="EAP-IG-inputs", level="node")),
    ("information-flow-routes", dict(method="information-flow-routes")),
    ("exact node", dict(method="exact", level="node")),
    ("EAP+EAP-IG-inputs", dict(method="EAP+EAP-IG-inputs")),
    ("EAP bootstrap=100", dict(method="EAP", bootstrap=100)),
]

# Summary ratios: (name, numerator label, denominator label, target).
TARGETS = [
    ("ifr_over_eap", "information-flow-routes", "EAP", 1.0),
    ("node_eap_over_edge_eap", "EAP node", "EAP", 1.0),
    ("ugs_step_over_eap_step", "UGS step", "EAP step", 2.0),
    ("edge_pruning_step_over_eap_step", "edge-pruning step", "EAP step", 2.0),
]
ACDC_TOY_TARGET_S = 60.0
_toy_done: set = set()  # the ACDC toy row is shape-independent: once per process


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def suite_methods(ctx, shape: str, n: int, batch: int, steps: int, repeats: int,
                  only: list[str] | None = None) -> list[dict]:
  """Rows of the `methods` suite for one shape: one per case of CASES (or of `only`, labels)."""
  cfg, params, _ = ctx.model(shape)
  ds, source = ctx.data(cfg, n)
  base = dict(suite="methods", shape=shape, n_params=common.n_params(cfg), n_examples=len(ds),
              batch_size=batch, seq_len=ds.max_len, data=source, dtype="float32", ig_steps=steps)
  rows = []
  for label, kw in CASES:
    if only and label not in only:
      continue
    kw = dict(A.get_method(kw["method"]).options_among({"ig_steps": steps}), **kw)
    log(f"[methods] {shape} {label}")

    def fn(kw=kw):
      return A.attribute(cfg, params, ds, batch_size=batch, quiet=True, **kw)

    t = common.time_calls(fn, repeats)
    rows.append(dict(base, case=label, **{k: v for k, v in kw.items() if k != "ig_steps"},
                     kernel="attribute", **t.as_dict(), examples_per_s=len(ds) / t.best_s))
  rows += step_rows(ctx, shape, n, repeats, only)
  if (not only or "ACDC toy" in only) and "acdc" not in _toy_done:
    _toy_done.add("acdc")
    rows.append(acdc_toy_row())
  best = {r["case"]: r["best_s"] for r in rows}
  summary = dict(suite="methods", shape=shape, summary=True, load_average=common.load_average())
  toy = [r for r in rows if r["case"] == "ACDC toy"]
  if toy:
    summary["acdc_toy_s"] = toy[0]["first_call_s"]
    summary["acdc_toy_s_target"] = ACDC_TOY_TARGET_S
  for name, a, b, target in TARGETS:
    if a in best and b in best:
      summary[name] = best[a] / best[b]
      summary[name + "_target"] = target
  return rows + [summary]


def step_rows(ctx, shape: str, n: int, repeats: int, only: list[str] | None = None) -> list[dict]:
  """One EAP batch, one UGS step and one Edge-Pruning step, each on the same batch of n examples."""
  cfg, params, _ = ctx.model(shape)
  ds, source = ctx.data(cfg, n)
  batch = next(ds.batches(len(ds)))
  task = ds.task
  abl = A.Patching()
  eap = A.get_method("EAP")
  steps = common.mask_step_calls(
      cfg, task, params, ugs.UGSOptions(ugs_samples=1, mask_batch=len(ds), mask_steps=1),
      edge_pruning.EdgePruningOptions(mask_batch=len(ds)), batch, batch)
  calls = {
      "EAP step": lambda: jax.block_until_ready(
          eap.score_batch(cfg, task, params, batch, abl, eap.make_options()).scores),
      **{f"{name} step": lambda fn=fn, args=args: jax.block_until_ready(fn(*args)[0][0])
         for name, (fn, args) in steps.items()},
  }
  base = dict(suite="methods", shape=shape, n_params=common.n_params(cfg), n_examples=len(ds),
              batch_size=len(ds), seq_len=ds.max_len, data=source, dtype="float32")
  rows = []
  for label, fn in calls.items():
    if only and label not in only:
      continue
    log(f"[methods] {shape} {label}")
    t = common.time_calls(fn, repeats)
    rows.append(dict(base, case=label, kernel="step", rows_per_step=len(ds), **t.as_dict()))
  return rows


def acdc_toy_row() -> dict:
  """ACDC through `attribute` on the bundled induction model, 64 examples (its default tau, KL)."""
  model = toy.load_toy()
  ds = toy.induction_task_dataset(64)
  log("[methods] toy ACDC")
  out = {}

  def run():
    out["res"] = A.attribute(model.cfg, model.params, ds, method="ACDC", quiet=True)

  t = common.time_calls(run, 1)
  res = out["res"]
  return dict(suite="methods", shape="toy", n_examples=len(ds), seq_len=ds.max_len,
              data="toy induction", case="ACDC toy", kernel="attribute", **t.as_dict(),
              n_edges_kept=int(res.extras["circuit"].sum()),
              evaluation_calls=int(res.extras["evaluation_calls"]))
