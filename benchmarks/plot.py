"""Plot benchmark results.

    python -m benchmarks.plot results.json [more.json ...] --out=benchmarks/results/cpu.png

Panels (those with data): whole-process wall time per implementation (phases stacked), attribution
time per method/kernel, time against #examples (the `scaling` suite), and time against model size
(the attribution suite's EAP-IG-inputs rows when it ran more than one shape).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(paths, out):
  rows = []
  for p in paths:
    with open(p) as f:
      rows += json.load(f)["results"]
  whole = [r for r in rows if r["suite"] == "whole_process"]
  attr = [r for r in rows if r["suite"] == "attribution"]
  scal = [r for r in rows if r["suite"] == "scaling"]
  # Time against model size: EAP-IG-inputs over the shapes of the attribution suite.
  size = [r for r in attr if r["method"] == "EAP-IG-inputs"]
  if len({r["shape"] for r in size}) < 2:
    size = []
  attr = [r for r in attr if r["shape"] == attr[0]["shape"]] if attr else attr
  panels = [x for x in (whole, attr, scal, size) if x]
  if not panels:
    sys.exit("no plottable rows")
  cols = min(2, len(panels))
  rows_ = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(7 * cols, 4.6 * rows_), squeeze=False)
  axes = list(axes.ravel())
  if whole:
    ax = axes.pop(0)
    labels = [f"{r['impl']}\n{r['kernel']}\n(rep {r['repeat']})" for r in whole]
    bottom = [0.0] * len(whole)
    for ph in ("import", "load_model", "load_data", "attribute"):
      vals = [r["phases"].get(ph, 0.0) for r in whole]
      ax.bar(labels, vals, bottom=bottom, label=ph)
      bottom = [b + v for b, v in zip(bottom, vals, strict=False)]
    ax.set_ylabel("seconds (fresh process, compile included)")
    ax.set_title(f"EAP-IG m=5, {whole[0]['shape']}, {whole[0]['n_examples']} examples")
    ax.legend()
  if attr:
    ax = axes.pop(0)
    labels = [f"{r['method']}\n{r['kernel']}" for r in attr]
    ax.bar(labels, [r["best_s"] for r in attr], color="tab:green")
    ax.set_ylabel("seconds after compile (best)")
    ax.set_title(f"attribution, {attr[0]['shape']}, {attr[0]['n_examples']} examples")
    ax.tick_params(axis="x", labelsize=7)
  if scal:
    ax = axes.pop(0)
    for k in sorted({r["kernel"] for r in scal}):
      pts = sorted((r["n_examples"], r["best_s"]) for r in scal if r["kernel"] == k)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
    ax.set_xlabel("#examples")
    ax.set_ylabel("seconds after compile")
    ax.set_title(f"EAP-IG m=5 time vs #examples ({scal[0]['shape']})")
    ax.legend()
  if size:
    ax = axes.pop(0)
    for k in sorted({r["kernel"] for r in size}):
      pts = sorted((r["n_params"], r["best_s"] / r["n_examples"], r["shape"])
                   for r in size if r["kernel"] == k)
      ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=k)
      for p in pts:
        ax.annotate(p[2], (p[0] / 1e6, p[1]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("seconds per example, after compile")
    ax.set_title("EAP-IG m=5 time vs model size")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--out=")]
  outs = [a[len("--out="):] for a in sys.argv[1:] if a.startswith("--out=")]
  main(args, outs[0] if outs else "benchmarks/results.png")
