"""High-level causal models for interchange interventions: variables, mechanisms, counterfactuals
and (base, source, counterfactual label) datasets."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxinterp.interventions.basic import InterventionError


class CausalModel:
  """A high-level causal model: input variables and mechanisms `var = fn(*parents)`.

  Example (the shipped toy): inputs a, b; S = (a + b) % p; O = S.

    cm = CausalModel(["a", "b"], {"S": (lambda a, b: (a + b) % p, ["a", "b"]),
                                  "O": (lambda s: s, ["S"])}, output="O")
    cm.counterfactual({"a": 1, "b": 2}, {"a": 3, "b": 3}, ["S"])  # -> (3 + 3) % p
  """

  def __init__(self, inputs: Sequence[str],
               mechanisms: Mapping[str, tuple[Callable, Sequence[str]]], output: str):
    self.inputs = list(inputs)
    self.mechanisms = dict(mechanisms)
    self.output = output
    known = set(self.inputs)
    self.order = []
    pending = dict(self.mechanisms)
    while pending:  # topological order; a cycle or unknown parent leaves some unresolved
      ready = [v for v, (_, ps) in pending.items() if all(p in known for p in ps)]
      if not ready:
        raise InterventionError("causal model has unknown parents or a cycle among "
                                f"{sorted(pending)}")
      for v in ready:
        self.order.append(v)
        known.add(v)
        del pending[v]
    if output not in known:
      raise InterventionError(f"output variable {output!r} is not defined")

  @property
  def variables(self) -> list[str]:
    return self.inputs + self.order

  def run(self, inputs: Mapping[str, Any], interventions: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Values of every variable, with `interventions` ({var: value}) fixed."""
    iv = dict(interventions)
    unknown = set(iv) - set(self.variables)
    if unknown:
      raise InterventionError(f"unknown causal variable(s) {sorted(unknown)}; "
                              f"have {self.variables}")
    vals = {k: iv.get(k, inputs[k]) for k in self.inputs}
    for v in self.order:
      fn, ps = self.mechanisms[v]
      vals[v] = iv[v] if v in iv else fn(*[vals[p] for p in ps])
    return vals

  def counterfactual(self, base: Mapping[str, Any], source: Mapping[str, Any],
                     variables: Sequence[str]) -> Any:
    """The output on `base` with `variables` set to their values on `source` (interchange)."""
    src = self.run(source)
    return self.run(base, {v: src[v] for v in variables})[self.output]

  def interchange_dataset(self, sample: Callable[[np.random.Generator], dict], n: int,
                          variables: Sequence[str], encode: Callable[[dict], Sequence[int]],
                          label: Callable[[Any], int] = int,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """(base, source, counterfactual label) triples as token arrays.

    Args:
      sample: rng -> input values; encode: input values -> token ids; label: output value -> token
      id.
    """
    rng = np.random.default_rng(seed)
    base, src, lab = [], [], []
    for _ in range(n):
      b, s = sample(rng), sample(rng)
      base.append(encode(b))
      src.append(encode(s))
      lab.append(label(self.counterfactual(b, s, variables)))
    return {"base": np.asarray(base, np.int32), "source": np.asarray(src, np.int32),
            "label": np.asarray(lab, np.int32)}
