"""Circuits over the EAP-IG edge graph: data plus free functions, one concept per module.

- `layout`: the edge layout of a model shape (names, validity, name parsing), `GraphShape`,
  `GraphError`;
- `graph`: the `Graph` (edge scores and a circuit's edge and node masks);
- `selection`: `top_n` (of edges, nodes or neurons: `level=`), `threshold`, `greedy`, `prune`
  (each `Graph -> Graph`) and `ranked`, the one ranking rule they share;
- `io`: EAP-IG `graph.json` and `.npz` files;
- `mib`: MIB evaluation arithmetic (faithfulness, CPR, CMD, IoU, curve sizes in counts and
  percentages, the circuits of MIB's protocol) and leaderboard submissions, pure numpy;
- `convention`: what the sign of a score means (`metric` in memory for jaxinterp's attribution,
  `loss` in files, EAP-IG's and MIB's); signed selection ranks by importance in both.

Imports run one way: `layout`, `convention` <- `selection`, `io` <- `mib`, and `graph` imports
`selection` and `io`; `selection`, `io` and `mib` take a graph (or, to read one, its class) and
never import `graph`.
"""

from jaxinterp.circuits import convention, graph, io, layout, mib, selection
from jaxinterp.circuits.graph import Graph
from jaxinterp.circuits.layout import GraphError, GraphShape
from jaxinterp.circuits.mib import (
                                    MIB_FRACTIONS,
                                    MIB_PERCENTAGES,
                                    SUBMISSION_PERCENTAGES,
                                    area_from_1,
                                    area_under,
                                    cmd,
                                    cpr,
                                    edge_iou,
                                    mib_circuits,
                                    mib_summary,
                                    n_edges_at_percentage,
                                    node_iou,
                                    normalized_faithfulness,
                                    sizes_and_percentages,
                                    write_submission,
)
from jaxinterp.circuits.selection import greedy, prune, ranked, threshold, top_n

__all__ = [
    "Graph", "GraphError", "GraphShape", "MIB_FRACTIONS", "MIB_PERCENTAGES",
    "SUBMISSION_PERCENTAGES",
    "area_from_1", "area_under", "cmd", "convention", "cpr", "edge_iou", "greedy", "mib_circuits",
    "mib_summary", "n_edges_at_percentage", "node_iou", "normalized_faithfulness", "prune",
    "ranked", "sizes_and_percentages", "threshold", "top_n", "write_submission",
    # modules
    "graph", "io", "layout", "mib", "selection",
]
