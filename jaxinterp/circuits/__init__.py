"""Circuits over the EAP-IG edge graph: data plus free functions, one concept per module.

- `layout`: the edge layout of a model shape (names, validity, name parsing), `GraphShape`,
  `GraphError`;
- `graph`: the `Graph` (edge scores and a circuit's edge and node masks);
- `selection`: `top_n`, `threshold`, `greedy`, `prune`, `top_n_nodes` (each `Graph -> Graph`);
- `io`: EAP-IG `graph.json` and `.npz` files;
- `mib`: MIB evaluation arithmetic (faithfulness, CPR, CMD, IoU), pure numpy.

Imports run one way: `layout` <- `selection`, `io`, `mib` <- `graph`; `selection` and `io` take
a graph (or, to read one, its class) and never import `graph`.
"""

from jaxinterp.circuits import graph, io, layout, mib, selection
from jaxinterp.circuits.graph import Graph
from jaxinterp.circuits.layout import GraphError, GraphShape
from jaxinterp.circuits.mib import (MIB_PERCENTAGES, cmd, cpr, edge_iou, n_edges_at_percentage,
                                    node_iou, normalized_faithfulness)
from jaxinterp.circuits.selection import greedy, prune, threshold, top_n, top_n_nodes

__all__ = [
    "Graph", "GraphError", "GraphShape", "MIB_PERCENTAGES", "cmd", "cpr", "edge_iou", "greedy",
    "n_edges_at_percentage", "node_iou", "normalized_faithfulness", "prune", "threshold", "top_n",
    "top_n_nodes",
]
