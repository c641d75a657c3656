"""The `evaluation` suite: circuit evaluation, the circuit forward against the graph-form reference.

    python -m benchmarks.run --suite=evaluation --shapes=gpt2-small --n=32 --out=results.json

Both paths of `evaluation.evaluate_circuits` are timed in the same run, warm (after a first call
that compiles, reported as `first_call_s`), on two sets of circuits:

- `mib-curve`: what `find_circuit` and MIB evaluate: the full model, the empty circuit and the
  pruned top-n circuits at MIB's ten percentages of EAP scores (computed here with `attribute`).
- `random`: --circuits random masks of density 1% to 100% (the suite's earlier definition, kept so
  the figures compare with older results; random circuits read nearly every node).

Each row reports circuits/s (circuits x examples per warm call) and the speedup of the circuit
forward over the reference. The faithfulness of the two paths is compared on the curve. A memory
row compares the compiled circuit forward with a plain forward of the same batch
(`memory_analysis`: arguments, outputs and temporaries).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxinterp import attribution as A
from jaxinterp import circuits as G
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.evaluation.faithfulness import evaluate_circuits
from jaxinterp.models.transformer import forward


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def _curve_weights(cfg, params, ds, batch: int):
  scores = A.attribute(cfg, params, ds, method="EAP", batch_size=batch, quiet=True).scores
  g = G.Graph.from_config(cfg, scores, score_convention=G.convention.for_task(ds.task))
  circuits = [g.top_n(G.n_edges_at_percentage(p, g.n_edges)) for p in G.MIB_PERCENTAGES]
  return np.stack([g.full().edge_weights(), g.empty().edge_weights()] +
                  [c.edge_weights() for c in circuits]).astype(np.float32)


def _random_weights(cfg, n_circuits: int):
  valid = valid_edges(cfg)
  rng = np.random.default_rng(0)
  density = np.linspace(0.01, 1.0, n_circuits)[:, None, None]
  return ((rng.random((n_circuits,) + valid.shape) < density) & valid).astype(np.float32)


def _memory_row(shape, cfg, params, ds, batch: int) -> dict:
  b = next(iter(ds.batches(batch)))
  fwd = CF.CircuitForward(cfg, params, ds.task, valid_edges(cfg))
  prep = jax.eval_shape(lambda: fwd.prepare(b, A.Patching()))
  w = jax.ShapeDtypeStruct(valid_edges(cfg).shape, jnp.float32)

  def total(m):  # an output aliased to a (donated) argument is counted once
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
            m.temp_size_in_bytes)

  scratch = jax.eval_shape(lambda: CF.scratch_like(fwd.cfg, prep))
  circuit = CF.circuit_metric.lower(fwd.cfg, fwd.task, fwd.params, b, prep, w, scratch).compile()
  plain = jax.jit(lambda p, t, mk: forward(cfg, p, t, attention_mask=mk)).lower(
      params, b.clean, b.mask).compile()
  mc, mp = circuit.memory_analysis(), plain.memory_analysis()
  gib = 2.0 ** 30
  return dict(suite="evaluation", shape=shape, kind="memory", batch_size=batch,
              seq_len=int(b.clean.shape[1]),
              circuit_total_gib=total(mc) / gib, circuit_temp_gib=mc.temp_size_in_bytes / gib,
              circuit_argument_gib=mc.argument_size_in_bytes / gib,
              plain_forward_total_gib=total(mp) / gib,
              plain_forward_temp_gib=mp.temp_size_in_bytes / gib,
              total_ratio=total(mc) / total(mp),
              note="XLA memory_analysis of one compiled call: the circuit forward's arguments "
                   "include the batch's prepared arrays (ablated senders, ablated residuals); the "
                   "plain forward computes the logits at every position")


def suite_evaluation(ctx, shape: str, n: int, batch: int, repeats: int, n_circuits: int,
                     chunk: int) -> list[dict]:
  """Rows of the `evaluation` suite for one shape (see the module docstring)."""
  cfg, params, _ = ctx.model(shape)
  ds, source = ctx.data(cfg, n)
  sets = [("mib-curve", _curve_weights(cfg, params, ds, batch)),
          ("random", _random_weights(cfg, n_circuits))]
  rows = []
  for name, weights in sets:
    C = len(weights)
    out = {}
    for path, reference in (("circuit-forward", False), ("reference", True)):
      log(f"[evaluation] {shape}: {name}, {C} circuits x {len(ds)} examples, {path}")

      def fn(weights=weights, reference=reference):
        return evaluate_circuits(cfg, params, ds, weights, batch_size=batch, chunk=chunk,
                                 quiet=True, reference=reference)

      t = common.time_calls(fn, repeats)
      out[path] = (t, fn())
      rows.append(dict(suite="evaluation", shape=shape, circuits=name, path=path,
                       kernel="evaluation.evaluate_circuits" + (" (reference=True)" if reference
                                                                else ""),
                       n_examples=len(ds), batch_size=batch, seq_len=ds.max_len, data=source,
                       dtype="float32", n_circuits=C, chunk=chunk if reference else None,
                       n_edges=[int(w.sum()) for w in weights], **t.as_dict(),
                       circuits_per_s=C / t.best_s, circuit_examples_per_s=C * len(ds) / t.best_s,
                       times="evaluate_circuits alone, warm (first_call_s includes compiles), "
                             "one process"))
    fast, ref = out["circuit-forward"], out["reference"]
    summary = dict(suite="evaluation", shape=shape, circuits=name, summary=True,
                   speedup_over_reference=ref[0].best_s / fast[0].best_s,
                   max_abs_metric_difference=float(np.abs(fast[1] - ref[1]).max()))
    if name == "mib-curve":

      def f(m):
        return (m[2:] - m[1]) / (m[0] - m[1])

      summary["max_abs_faithfulness_difference"] = float(np.abs(f(fast[1]) - f(ref[1])).max())
    rows.append(summary)
  rows.append(_memory_row(shape, cfg, params, ds, batch))
  return rows
