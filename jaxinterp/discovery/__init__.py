"""Circuit discovery as a library pipeline: `find_circuit(config, out)`.

- `config`: `FindCircuitConfig`, every setting of a run (one field per flag of
  `experiments/find_circuit.py`), and `record(config)`, the flat dict of them that is both the
  run's checkpoint fingerprint and the base of graph.json's `meta`;
- `flags`: the method options' command-line flags, generated from the registered methods' options
  dataclasses (`attribution.METHODS`) and optimal ablation's;
- `pipeline`: `find_circuit(config, out) -> summary`: load, attribute (resumable), select,
  evaluate, write (edge, node and neuron levels; it hands the others on);
- `positions`: the --level=position run, and the faithfulness curve's files, `meta` and report
  that the span level shares;
- `spans`: the --schema run: span edges, their circuit and curve.

Imports run one way: `config`, `flags` <- `positions` <- `spans` <- `pipeline`.
"""

from jaxinterp.discovery import config, flags, pipeline
from jaxinterp.discovery.config import FindCircuitConfig, record
from jaxinterp.discovery.pipeline import check, find_circuit

__all__ = ["FindCircuitConfig", "check", "config", "find_circuit", "flags", "pipeline", "record"]
