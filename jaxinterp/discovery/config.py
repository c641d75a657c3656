"""`FindCircuitConfig`: every setting of a `find_circuit` run, one field per flag of
`experiments/find_circuit.py`, as flax examples keep a run's settings in one config.

`record(config)` is `dataclasses.asdict(config)` with the method's and optimal ablation's options
spread into it: a flat dict of settings by flag name. It is both the run's fingerprint (what a
checkpoint must match to be resumed) and the base of graph.json's `meta`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxinterp.runtime import inputs

# The fields holding options by name, spread into `record`.
OPTION_FIELDS = ("options", "optimal")


TOP_N = 20  # the circuit's size when `top_n` is None and the method has no circuit of its own


@dataclasses.dataclass(frozen=True)
class FindCircuitConfig:
  """The settings of a `find_circuit` run (the flags of `experiments/find_circuit.py`).

  Attributes:
    model: HF checkpoint dir, orbax conversion dir, or "toy" (the bundled induction model).
    dtype: the params' dtype, "float32" or "bfloat16" (None: the checkpoint's own).
    tokenizer: a tokenizer.json, or a directory holding one, for a model without its own (None:
      the model directory's).
    task: a name in `tasks.task_names()`.
    data: CSV of clean/corrupted prompt pairs, or a local copy of an MIB dataset (None: generated,
      induction only).
    mib_split: the split read from an MIB copy.
    n_examples: examples to attribute on (at least 1).
    prepend_bos: prepend BOS as TransformerLens does.
    seed: seed of generated data, of the bootstrap's resampling and of mask training.
    skip_bad_rows: leave out unusable rows of `data` instead of stopping at them.
    filter: "none", or "correct": keep only the rows the model gets right (clean metric above the
      corrupted one, by the task's own metric: `evaluation.task_check`).
    metric: "task" (the task's default) or a name in `tasks.METRICS`.
    method: a name in `attribution.METHODS`, or an ensemble "A+B".
    options: the method's options given, by name (`Method.make_options`: "level", "remat",
      "ig_steps", "tau", ...); the rest are the method's defaults. One the method does not have is
      refused.
    intervention: how ablated edges are valued (`attribution.INTERVENTIONS`).
    optimal: `optimal.OptimalOptions` given by name (intervention "optimal": "oa_steps", ...).
    optimal_values: intervention "optimal": load the constants from this directory (an earlier
      run's `out/optimal_ablation`) instead of training them.
    batch_size: examples per compiled call.
    bootstrap: B >= 2 resamples of the batches (None: no bootstrap).
    checkpoint_batches: checkpoint after every batch when a run has more batches than this (the
      methods that `checkpoints_always` always do).
    mesh: device mesh "DATAxMODEL" (None: one device).
    fsdp: with `mesh`, also split each weight matrix over DATA (`sharding.shard_params`).
    top_n: items (edges, nodes or neurons) in the selected circuit; None: the method's own circuit
      if it has one, else 20.
    curve_sizes: "counts" or "mib" (`evaluation.faithfulness.curve_sizes`).
    selection: "top_n" or "greedy" (edges only).
    absolute: rank by |score| (else by signed score).
    mib_out: also write the edge scores as an MIB leaderboard submission under this directory.
    mib_format: "importances" or "circuits".
    mib_model: the model's name in `mib_out` (None: the model directory's name).
    schema: with level "position", a bundled schema's name (`circuits.schemas.SCHEMAS`): the
      circuit is made of span edges (`discovery.spans`); None: of position edges.
    span_aggregation: with `schema`, how each row's position scores are aggregated over its spans:
      "sum", "mean" or "max_abs" (None: "sum").
  """

  model: str = inputs.TOY
  dtype: str | None = None
  tokenizer: str | None = None
  task: str = "induction"
  data: str | None = None
  mib_split: str = "train"
  n_examples: int = 64
  prepend_bos: bool = True
  seed: int = 0
  skip_bad_rows: bool = False
  filter: str = "none"
  metric: str = "task"
  method: str = "EAP-IG-inputs"
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  intervention: str = "patching"
  optimal: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimal_values: str | None = None
  batch_size: int = 16
  bootstrap: int | None = None
  checkpoint_batches: int = 8
  mesh: str | None = None
  fsdp: bool = False
  top_n: int | None = None
  curve_sizes: str = "counts"
  selection: str = "top_n"
  absolute: bool = True
  mib_out: str | None = None
  mib_format: str = "importances"
  mib_model: str | None = None
  schema: str | None = None
  span_aggregation: str | None = None


def record(config: FindCircuitConfig) -> dict:
  """`dataclasses.asdict(config)` with `options` and `optimal` spread into it (flat, by flag name):
  the run's fingerprint and the base of graph.json's `meta`. InputError if an option's name is
  also a field's."""
  out = dataclasses.asdict(config)
  spread = {}
  for name in OPTION_FIELDS:
    for k, v in out.pop(name).items():
      if k in out or k in spread:
        raise inputs.InputError(f"option {k!r} of {name} is also a setting of its own")
      spread[k] = v
  return dict(out, **spread)
