"""Evaluating circuits: how much of the model's behaviour a circuit keeps.

Modules:
- `faithfulness`: evaluate circuits of edges (the metric with every edge outside the circuit
  ablated), faithfulness curves, MIB's CPR/CMD scores and protocol;
- `circuit_forward`: the fast forward that evaluates many edge circuits per compiled call;
- `levels`: node and neuron circuits (selection counts, the neuron-circuit forward, their curves);
- `position_circuits`: circuits of position-level edges (local and crossing), their forward,
  faithfulness curve and CPR/CMD (`find_circuit --level=position`);
- `task_check`: whether the model does the task (clean against corrupted metric, top-1 accuracy)
  and `--filter=correct`;
- `report`: `evaluate_circuit(config, out)`, the pipeline of `experiments/evaluate_circuit.py`
  (a saved circuit's faithfulness, curve, MIB's CPR/CMD, IoU against another circuit, its files).
- `position_report`: the same for a saved position- or span-level circuit (`evaluate_circuit`
  reads `find_circuit --level=position [--schema]`'s graph.json).
"""

from jaxinterp.evaluation import circuit_forward, faithfulness, levels
from jaxinterp.evaluation.faithfulness import (
    FaithfulnessCurve,
    baselines,
    compile_ahead,
    curve_sizes,
    evaluate_circuits,
    faithfulness_curve,
    mean_over_batches,
    mib_protocol,
    mib_scores,
    normalize,
)

__all__ = [
    "FaithfulnessCurve", "baselines", "compile_ahead", "curve_sizes",
    "evaluate_circuits", "faithfulness_curve", "mean_over_batches", "mib_protocol", "mib_scores",
    "normalize", "circuit_forward", "faithfulness", "levels",
]
