"""The circuit viewer's page for a graph file (`experiments/view.py`'s pipeline).

`write_page(ViewConfig(graph=...))` reads any EAP-IG-format graph JSON (ours, the PyTorch
EAP-IG's, MIB's; the model shape comes from the file's `cfg`; a position-level graph.json is drawn
by `position_viewer`), renders the offline HTML page of
`viewer.render_html` and writes it (default: `circuit.html` beside the graph, or `view.html` where
`circuit.html` is an output of the finished run in that directory). A file that is another run's
output (listed in its directory's `DONE`) is never replaced unless `overwrite`. Everything is
checked and rendered before the file is written; bad input raises `inputs.InputError` naming the
flag or file.
"""

from __future__ import annotations

import dataclasses
import os

from jaxinterp.circuits import Graph, GraphError
from jaxinterp.runtime import files, inputs
from jaxinterp.viz import position_viewer, viewer

DEFAULT_NAME = "circuit.html"  # beside the graph
OWN_NAME = "view.html"  # beside the graph, where circuit.html is a finished run's


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """What `write_page` draws. Fields named as the binary's flags."""

  graph: str | None = None  # EAP-IG-format graph JSON
  curve: str | None = None  # faithfulness CSV (columns n_edges, faithfulness) shown beside it
  out: str | None = None  # HTML file to write (default: circuit.html beside `graph`)
  title: str | None = None  # default: the graph's method and task, or its file name
  n: int | None = None  # initial circuit size in edges (default: the graph's top_n, ...)
  max_drawn: int = viewer.MAX_DRAWN  # draw at most this many edges (the strongest)
  overwrite: bool = False  # replace `out` even when it is an output of a finished run


def write_page(config: ViewConfig) -> str:
  """Write the page for `config.graph` and return its path."""
  graph_path, out, n, max_drawn = config.graph, config.out, config.n, config.max_drawn
  inputs.input_file("graph", graph_path, required=": an EAP-IG-format graph JSON")
  inputs.input_file("curve", config.curve)
  if not out:
    beside = os.path.dirname(os.path.abspath(graph_path))
    out = os.path.join(beside, DEFAULT_NAME)
    if files.owning_run(out):  # the run's own page: write ours beside it
      out = os.path.join(beside, OWN_NAME)
  owner = files.owning_run(out)
  if owner and not config.overwrite:
    raise inputs.InputError(f"--out={out} is an output of the {owner} in its directory; give "
                            f"another file, or pass --overwrite to replace it")
  if os.path.isdir(out):
    raise inputs.InputError(f"--out={out} is a directory; give the HTML file to write")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise inputs.InputError(f"--out={out}: its directory does not exist")
  if max_drawn < 1:
    raise inputs.InputError(f"--max_drawn={max_drawn}: must be at least 1")
  if position_viewer.is_position_graph(graph_path):  # find_circuit --level=position's graph.json
    return position_viewer.write_view(graph_path, out, title=config.title, curve=config.curve,
                                      n=n, max_drawn=max_drawn)
  try:
    graph = Graph.from_json(graph_path)
  except GraphError as e:
    raise inputs.InputError(f"--graph: {e}") from None
  title = config.title
  if title is None:
    m = graph.meta
    title = (f"{m['method']} on {m['task']}" if isinstance(m.get("method"), str)
             and isinstance(m.get("task"), str) else os.path.basename(graph_path))
  if n is not None and not 0 <= n <= graph.n_edges:
    raise inputs.InputError(f"--n={n}: must be an edge count in [0, {graph.n_edges}]")
  try:
    page = viewer.render_html(graph, curve=config.curve or None, title=title, n=n,
                              max_drawn=max_drawn)
  except viewer.ViewerError as e:  # graph, n and max_drawn are checked above: the curve is bad
    raise inputs.InputError(f"--curve: {e}") from None
  try:
    files.atomic_write_text(out, page)
  except OSError as e:
    raise inputs.InputError(f"--out={out}: cannot write: {e}") from None
  return out
