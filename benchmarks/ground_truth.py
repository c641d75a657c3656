"""Known-circuit recovery: method x program -> edge/node AUROC and time, on tracr-compiled programs
and the bundled toy model.

    python -m benchmarks.ground_truth --out=benchmarks/results/results_cpu_ground_truth.json

Runs `jaxinterp.groundtruth.recovery.benchmark` on every case of `--cases` (tracr's library
programs as `jaxinterp.groundtruth.tracr_tasks.LIBRARY` compiles them, and `toy`), every registered
method, under patching and zero ablation of every sender (`zero-all`; the treatment of edges an
ablation cannot see is `jaxinterp/groundtruth/truth.py`'s), plus EAP-IG-inputs with
`--more_ig_steps` steps to show whether more interpolation steps help. Writes the JSON
(environment, settings, every figure) and prints the Markdown tables of `docs/ground_truth.md`.
Times are wall seconds of `attribution.attribute`, compilation included (each call compiles:
the models are tiny, so compiling dominates).
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax
from absl import app, flags

from jaxinterp import attribution
from jaxinterp.groundtruth import recovery

_CASES = flags.DEFINE_string("cases", "reverse,frac_prevs,sort,hist,sort_freq,pair_balance,toy",
                             "comma-separated cases")
_N = flags.DEFINE_integer("n_examples", 16, "input pairs per tracr program (toy: 64 prompts)")
_MORE = flags.DEFINE_integer("more_ig_steps", 50, "also run EAP-IG-inputs with this many steps "
                             "(0: no)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/results_cpu_ground_truth.json",
                          "JSON results")
_TABLE = flags.DEFINE_string("table", None, "also write the Markdown table here")


def main(argv):
  del argv
  methods = list(attribution.METHODS)
  entries = {}
  for name in [c.strip() for c in _CASES.value.split(",") if c.strip()]:
    case = (recovery.toy_case(max(64, _N.value)) if name == "toy"
            else recovery.library_case(name, _N.value))
    results = recovery.benchmark(case, methods, ("patching", "zero-all"))
    if _MORE.value:
      more = recovery.benchmark(case, ["EAP-IG-inputs"], ("patching",), ig_steps=_MORE.value)
      for r in more:
        r.method = f"EAP-IG-inputs (m={_MORE.value})"
      results += more
    entries[name] = recovery.summary(case, results)
    print(recovery.table({name: entries[name]}), flush=True)
  env = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
         "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
         "python": platform.python_version(), "loadavg": os.getloadavg()}
  out = {"env": env, "settings": {"n_examples": _N.value, "ig_steps": 5,
                                  "more_ig_steps": _MORE.value, "methods": methods},
         "programs": entries}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  text = "".join(f"\n{level} AUROC under {iv}:\n\n" + recovery.matrix(entries, iv, level)
                 for iv in ("patching", "zero-all") for level in ("edge", "node"))
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
