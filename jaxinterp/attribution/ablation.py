"""What an ablated edge carries: the corrupted run (patching), zero, the mean sender output, or the
learned optimal-ablation constant (`optimal`, trained by `attribution.optimal`).

An edge s -> r outside the circuit (or under attribution) makes its receiver read the sender's
ablated value instead of its clean one. Each intervention is a small pytree (`Patching`, `Zero`,
`ZeroAll`, `Mean`, `MeanPositional`, `Optimal`) whose `values` gives those values for a batch; the
graph-form forward (`models.EdgePatch`) and every method take them as an explicit argument.
"""

from __future__ import annotations

import os

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.attribution import base, optimal
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import positions_of, sender_outputs
from jaxinterp.runtime import distributed
from jaxinterp.tasks import Batch, Dataset

Array = jax.Array

INTERVENTIONS = ("patching", "zero", "mean", "mean-positional", "optimal", "zero-all")
POSITION_INTERVENTIONS = ("patching", "zero", "zero-all", "mean", "mean-positional")
"""The ablations of position-level scores and circuits (each sender's ablated value per position
is direct: a corrupted run, zeros or means; not optimal ablation's learned constants)."""


def _kind(name: str):
  return flax.struct.field(pytree_node=False, default=name, kw_only=True, repr=False)


class Ablation(flax.struct.PyTreeNode):
  """Counterfactual sender values: one pytree type per intervention (`Patching`, `Zero`, `ZeroAll`,
  `Mean`, `MeanPositional`, `Optimal`), each with its own `values`. `kind` is its name in
  INTERVENTIONS (`--intervention`); `make_ablation(..., kind)` builds one from the data.

  `kind` is set by each type (never given) and is static pytree metadata rather than only a class
  attribute: JAX compares the pytree structures of two dataclass types with the same fields as
  equal, and the name keeps, e.g., `Patching()` and `Zero()` apart wherever structures are
  compared.
  """

  kind: str = _kind("")

  def __post_init__(self):
    own = type(self).__dataclass_fields__["kind"].default
    if self.kind != own:  # set by each type, never given
      raise base.AttributionError(f"{type(self).__name__} is the {own!r} ablation, not "
                                  f"{self.kind!r}")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    """The ablated sender outputs for a batch: Float[Array, "batch pos sender d_model"]."""
    raise NotImplementedError


def _shape(cfg: ModelConfig, batch: Batch) -> tuple[int, int, int, int]:
  return batch.clean.shape + (E.n_senders(cfg), cfg.d_model)


def _dtype(params):
  return jax.tree.leaves(params)[0].dtype


class Patching(Ablation):
  """Interchange ablation: each sender's output on the corrupted prompt."""

  kind: str = _kind("patching")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    return sender_outputs(cfg, params, batch.corrupted, batch.mask)


class Zero(Ablation):
  """Zero, as EAP-IG: every sender is zeroed except the input node's position embedding. EAP-IG's
  input node is `hook_embed` (TransformerLens' token embedding alone), so a zero-ablated input
  edge still carries the position embedding, which is never ablated."""

  kind: str = _kind("zero")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    zeros = jnp.zeros(_shape(cfg, batch), _dtype(params))
    if cfg.positional != "learned":
      return zeros
    return zeros.at[:, :, 0].set(params["W_pos"][positions_of(batch.mask)].astype(zeros.dtype))


class ZeroAll(Ablation):
  """Zero for every sender, the position embedding too (the whole input node)."""

  kind: str = _kind("zero-all")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    return jnp.zeros(_shape(cfg, batch), _dtype(params))


class Mean(Ablation):
  """Each sender's mean output over the real tokens of a reference dataset (`compute_means`; ours,
  not EAP-IG's `compute_mean_activations`: see README, mean ablations).

  means: Float[Array, "sender d_model"].
  """

  means: Array
  kind: str = _kind("mean")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    return jnp.broadcast_to(self.means.astype(_dtype(params)), _shape(cfg, batch))


class MeanPositional(Ablation):
  """Each sender's mean output at each position (positions past the means' length: zero).

  means: Float[Array, "pos sender d_model"] (`compute_means(..., positional=True)`).
  """

  means: Array
  kind: str = _kind("mean-positional")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    P = batch.clean.shape[1]
    means = self.means[:P]
    if means.shape[0] < P:
      pad = jnp.zeros((P - means.shape[0],) + means.shape[1:], means.dtype)
      means = jnp.concatenate([means, pad])
    return jnp.broadcast_to(means.astype(_dtype(params)), _shape(cfg, batch))


class Optimal(Ablation):
  """Optimal ablation: each sender's learned constant c_s (`optimal.learn_optimal_values`).

  constants: Float[Array, "sender d_model"].
  """

  constants: Array
  kind: str = _kind("optimal")

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    return jnp.broadcast_to(self.constants.astype(_dtype(params)), _shape(cfg, batch))


def compute_means(cfg: ModelConfig, params, dataset: Dataset, batch_size: int,
                  positional: bool = False) -> Array:
  """Mean sender outputs over the real tokens of `dataset`'s clean prompts.

  Returns Float[Array, "sender d_model"], or Float[Array, "pos sender d_model"] if `positional`.
  In a multi-process run the batches are split over the processes and their float32 sums added in
  batch order on every process (`distributed.fold_split`): one process's means, bitwise. A
  collective: every process calls it.
  """
  fn = jax.jit(lambda p, t, m: sender_outputs(cfg, p, t, m))

  def one(i, batch):  # process p of N runs batches p, p + N, ... (`distributed.fold_split`)
    acts = fn(params, batch.clean, batch.mask).astype(jnp.float32)
    w = (batch.mask & batch.valid[:, None]).astype(jnp.float32)  # [B, P]
    if positional:
      return {"s": jnp.einsum("bpsd,bp->psd", acts, w), "c": w.sum(0)}
    return {"s": jnp.einsum("bpsd,bp->sd", acts, w), "c": w.sum()}

  def add(acc, part):  # float32 sums in batch order on every process: one process's, bitwise
    s, c = jnp.asarray(part["s"]), jnp.asarray(part["c"])
    return (s, c) if acc is None else (acc[0] + s, acc[1] + c)

  total, count = distributed.fold_split(dataset.batches(batch_size, bucket=None), one, add,
                                        None) or (None, None)
  if positional:
    return total / jnp.maximum(count, 1.0)[:, None, None]
  return total / jnp.maximum(count, 1.0)


def make_ablation(cfg: ModelConfig, params, dataset: Dataset, intervention: str, batch_size: int,
                  mean_dataset: Dataset | None = None,
                  optimal_values: None | str | optimal.OptimalOptions = None) -> Ablation:
  """Build the `Ablation` for an intervention name (means from `mean_dataset`, default `dataset`).

  For "optimal", `optimal_values` is a directory written by `optimal.save_values` (loaded), or
  `OptimalOptions` / None (default options): the constants are then trained on the clean prompts of
  `mean_dataset` (default `dataset`), starting from the means. Training takes time; build the
  ablation once and pass it to `attribute(..., ablation=)` and the evaluation functions.
  """
  if intervention not in INTERVENTIONS:
    raise base.AttributionError(f"unknown intervention {intervention!r}; choose from "
                                f"{INTERVENTIONS}")
  if intervention == "patching" and not getattr(dataset, "has_corrupted", True):
    raise base.AttributionError(f"intervention='patching' ablates to the corrupted prompts, but "
                                f"the dataset {dataset.source or ''} has none; use 'zero', "
                                f"'mean' or 'mean-positional'")
  if intervention == "optimal":
    if isinstance(optimal_values, (str, os.PathLike)):
      return Optimal(jnp.asarray(optimal.load_values(optimal_values, cfg)[0]))
    data = mean_dataset or dataset
    means = compute_means(cfg, params, data, batch_size)
    values, _ = optimal.learn_optimal_values(cfg, params, data, means,
                                             optimal_values or optimal.OptimalOptions())
    return Optimal(jnp.asarray(values))
  if intervention == "mean":
    return Mean(compute_means(cfg, params, mean_dataset or dataset, batch_size))
  if intervention == "mean-positional":
    return MeanPositional(compute_means(cfg, params, mean_dataset or dataset, batch_size,
                                        positional=True))
  return {"patching": Patching, "zero": Zero, "zero-all": ZeroAll}[intervention]()
