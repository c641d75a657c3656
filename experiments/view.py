"""Build the interactive circuit viewer (one offline HTML page) from an EAP-IG graph JSON.

    python -m experiments.view --graph=runs/find_circuit/graph.json \\
        --curve=runs/find_circuit/faithfulness.csv --out=circuit.html

Reads any EAP-IG-format graph JSON (ours, the PyTorch EAP-IG's, MIB's); the model shape comes from
the file's `cfg`. The page draws the top-n circuit by |score| (pruned, as `Graph.top_n`) for any n
set with its slider, number inputs or MIB's percentages; see `jaxinterp/viz/viewer.py`. A
position-level graph.json (find_circuit --level=position) is drawn between token-position columns
instead (`jaxinterp/viz/position_viewer.py`; no --curve or --n there). Open the
file in a browser: it makes no network request. Bad input ends with one line on stderr naming the
flag or file, a non-zero exit status and no output file. The pipeline is
`jaxinterp.viz.page.write_page`.
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli
from jaxinterp.viz import page

D = cli.defaults(page.ViewConfig)
cli.define("string", "graph", D["graph"],
           "EAP-IG-format graph JSON to show (ours, the PyTorch EAP-IG's or MIB's), or "
           "find_circuit --level=position's graph.json.")
cli.define("string", "curve", D["curve"], "Optional faithfulness CSV (columns n_edges, "
           "faithfulness; find_circuit and evaluate_circuit write faithfulness.csv) shown beside "
           "the graph.")
cli.define("string", "out", D["out"], "HTML file to write (default: circuit.html beside --graph, "
           "or view.html where circuit.html is an output of a finished run).")
cli.define("bool", "overwrite", D["overwrite"], "Replace --out even when it is an output of a "
           "finished run (listed in its directory's DONE).")
cli.define("string", "title", D["title"],
           "Page title (default: the graph's method and task, or its file name).")
cli.define("integer", "n", D["n"], "Initial circuit size in edges (default: the graph's top_n, "
           "else its circuit's edge count, else 1% of the edges).")
cli.define("integer", "max_drawn", D["max_drawn"],
           "Draw at most this many edges; larger circuits show their strongest.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  print(f"wrote {page.write_page(cli.config(page.ViewConfig))}")


if __name__ == "__main__":
  cli.run(main)
