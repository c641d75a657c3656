"""Build the interactive circuit viewer (one offline HTML page) from an EAP-IG graph JSON.

    python -m experiments.view --graph=runs/find_circuit/graph.json \\
        --curve=runs/find_circuit/faithfulness.csv --out=circuit.html

Reads any EAP-IG-format graph JSON (ours, the PyTorch EAP-IG's, MIB's); the model shape comes from the
file's `cfg`. The page draws the top-n circuit by |score| (pruned, as `Graph.top_n`) for any n set
with its slider, number inputs or MIB's percentages; see `jaxinterp/viz/viewer.py`. Open the file in a
browser: it makes no network request. Bad input ends with one line on stderr naming the flag or
file, a non-zero exit status and no output file.
"""

from __future__ import annotations

import os

from absl import app

from jaxinterp.runtime import files
from jaxinterp.viz import viewer
from jaxinterp.circuits import Graph, GraphError
from jaxinterp.experiments import cli

DEFAULTS = dict(graph=None, curve=None, out=None, title=None, n=None, max_drawn=viewer.MAX_DRAWN)
_FLAGS = [
    ("string", "graph", "EAP-IG-format graph JSON to show (ours, the PyTorch EAP-IG's or MIB's)."),
    ("string", "curve", "Optional faithfulness CSV (columns n_edges, faithfulness; find_circuit and "
                        "evaluate_circuit write faithfulness.csv) shown beside the graph."),
    ("string", "out", "HTML file to write (default: circuit.html beside --graph)."),
    ("string", "title", "Page title (default: the graph's method and task, or its file name)."),
    ("integer", "n", "Initial circuit size in edges (default: the graph's top_n, else its circuit's "
                     "edge count, else 1% of the edges)."),
    ("integer", "max_drawn", "Draw at most this many edges; larger circuits show their strongest."),
]
for _kind, _name, _help in _FLAGS:
  cli.define(_kind, _name, DEFAULTS[_name], _help)


def _flag(name):
  return cli.value(name, DEFAULTS[name])


def build(graph_path, curve_path=None, out=None, title=None, n=None,
          max_drawn=viewer.MAX_DRAWN) -> str:
  """Write the page for `graph_path` and return its path.

  Everything is checked and rendered before the file is written; `app.UsageError` names the bad flag
  or file (`cli.run` prints it as one line on stderr and exits with status 2).
  """
  cli.input_file("graph", graph_path, required=": an EAP-IG-format graph JSON")
  cli.input_file("curve", curve_path)
  out = out or os.path.join(os.path.dirname(os.path.abspath(graph_path)), "circuit.html")
  if os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a directory; give the HTML file to write")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise app.UsageError(f"--out={out}: its directory does not exist")
  if max_drawn < 1:
    raise app.UsageError(f"--max_drawn={max_drawn}: must be at least 1")
  try:
    graph = Graph.from_json(graph_path)
  except GraphError as e:
    raise app.UsageError(f"--graph: {e}") from None
  if title is None:
    m = graph.meta
    title = (f"{m['method']} on {m['task']}" if isinstance(m.get("method"), str)
             and isinstance(m.get("task"), str) else os.path.basename(graph_path))
  if n is not None and not 0 <= n <= graph.n_edges:
    raise app.UsageError(f"--n={n}: must be an edge count in [0, {graph.n_edges}]")
  try:
    page = viewer.render_html(graph, curve=curve_path or None, title=title, n=n,
                              max_drawn=max_drawn)
  except viewer.ViewerError as e:  # graph, n and max_drawn are checked above: the curve is bad
    raise app.UsageError(f"--curve: {e}") from None
  try:
    files.atomic_write_text(out, page)
  except OSError as e:
    raise app.UsageError(f"--out={out}: cannot write: {e}") from None
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = build(_flag("graph"), _flag("curve"), _flag("out"), _flag("title"), _flag("n"),
              _flag("max_drawn"))
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
