"""Score attribution methods against circuits known exactly: tracr-compiled RASP programs.

    python -m experiments.ground_truth --program=prog.py:make_program --vocab=0,1,2,3 \\
        --max_seq_len=5 --methods=EAP,EAP-IG-inputs,exact --out=runs/ground_truth
    python -m experiments.ground_truth --out=runs/ground_truth    # the built-in set

`--program=FILE.py:FUNCTION` names a function that takes no arguments and returns a RASP SOp (the
program's output). It is compiled with tracr (`compiler_bos="BOS"`, `--causal` for a causal model;
tracr's default is non-causal) for the vocabulary `--vocab` (comma-separated; integers are read as
ints) and inputs of up to `--max_seq_len` values, ported to jaxinterp's decoder, and its true
circuit is derived from the weights (jaxinterp/groundtruth/truth.py: an edge is true iff its sender
writes a residual direction its receiver reads). Clean and corrupted inputs are sampled uniformly;
the metric is the output-space value of the clean output at `--position` (default: every position).
Each `--methods` entry runs under each `--interventions` ablation it supports.

Without `--program` it runs the built-in set (`--builtin`): tracr's library programs (reverse,
frac_prevs, sort, hist, sort_freq, pair_balance) and the bundled toy induction model
with its documented circuit, each in its own subdirectory of `--out`.

Writes, per program: `truth.json` (the true circuit, EAP-IG graph format: `in_graph` marks the true
edges), `{method}/graph.json` (the method's scores under patching; `graph.{intervention}.json` under
the other ablations; the top edges by |score|, as many as there are true ones, are `in_graph`), and
`auroc.json` in `--out`: edge- and node-level AUROC by |score| for every method and ablation, the
time each took, and how many true edges the ablation can see. True edges that only carry what is
the same in the clean and the ablated run (positions, BOS, a constant length) are left out of that
ablation's AUROC (see jaxinterp/groundtruth/truth.py). tracr is optional: pip install
"jaxinterp[tracr]". The pipeline is `jaxinterp.groundtruth.runner.ground_truth`.
"""

from __future__ import annotations

from absl import app

from jaxinterp import attribution
from jaxinterp.experiments import cli, common
from jaxinterp.groundtruth import runner

D = cli.defaults(runner.GroundTruthConfig)
OUT = "runs/ground_truth"
cli.define("string", "program", None, "FILE.py:FUNCTION returning the RASP program's output "
           "SOp. Without it: the built-in set.")
cli.define("string", "vocab", None, "The program's vocabulary, comma-separated (ints read as "
           "ints), e.g. 0,1,2,3 or a,b,c. Required with --program.")
cli.define("integer", "max_seq_len", None, "Longest input (BOS not counted); inputs are sampled at "
           "this length. Required with --program.")
cli.define("bool", "causal", D["causal"], "Compile a causal model (tracr's default is non-causal).")
cli.define("string", "methods", D["methods"],
           f"Comma-separated attribution methods, of: {', '.join(attribution.METHODS)}.")
cli.define("string", "interventions", D["interventions"],
           f"Comma-separated ablations, of: {', '.join(runner.INTERVENTIONS)}; a method runs under "
           f"those it supports (EAP-IG-inputs: patching only). zero-all zeroes every sender, "
           f"positions included, so it also sees the edges that patching cannot.")
cli.define("string", "position", D["position"], "Output position the metric reads (0-based, BOS "
           "not counted), or 'all' for every position (one row per example and position).")
cli.define("integer", "n_examples", D["n_examples"], "Clean/corrupted input pairs per program (the "
           "toy model: this many prompts, at least 64).")
cli.define("integer", "ig_steps", D["ig_steps"], "Integrated-gradient steps of the EAP-IG methods.")
cli.define("integer", "batch_size", D["batch_size"], "Rows per batch.")
cli.define("integer", "seed", D["seed"], "Seed of the sampled inputs.")
cli.define("string", "builtin", D["builtin"],
           f"Without --program: the built-in programs to run, of: {', '.join(runner.BUILTIN)}.")
cli.define("string", "out", OUT, "Output directory.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config(runner.GroundTruthConfig)
  common.start_run()
  runner.ground_truth(config, cli.value("out", OUT), overwrite=cli.value("overwrite", False))


if __name__ == "__main__":
  cli.run(main)
