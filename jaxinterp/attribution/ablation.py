"""What an ablated edge carries: the corrupted run (patching), zero, the mean sender output, or the
learned optimal-ablation constant (`optimal`, trained by `attribution.optimal`).

An edge s -> r outside the circuit (or under attribution) makes its receiver read the sender's
ablated value instead of its clean one. `Ablation.values` gives those values for a batch; the
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


@flax.struct.dataclass
class Ablation:
  """Counterfactual sender values: `kind` in INTERVENTIONS, and `means` for the mean ablations.

  "zero" follows EAP-IG: every sender is zeroed except the input node's position embedding (EAP-IG's
  input node is `hook_embed`, the token embedding alone), so only the token embedding is ablated.
  "zero-all" zeroes the position embedding too (the whole input node, as jaxinterp's "zero" did).
  The means are ours, not EAP-IG's `compute_mean_activations` (see README: mean ablations).

  means: Float[Array, "sender d_model"] (mean) or Float[Array, "pos sender d_model"]
  (mean-positional), averaged over real tokens of a reference dataset; for "optimal", the learned
  constants c_s, Float[Array, "sender d_model"] (`optimal.learn_optimal_values`).
  """

  kind: str = flax.struct.field(pytree_node=False, default="patching")
  means: Array | None = None

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    """The ablated sender outputs for a batch: Float[Array, "batch pos sender d_model"]."""
    B, P = batch.clean.shape
    if self.kind == "patching":
      return sender_outputs(cfg, params, batch.corrupted, batch.mask)
    dtype = jax.tree.leaves(params)[0].dtype
    shape = (B, P, E.n_senders(cfg), cfg.d_model)
    if self.kind == "zero-all":  # the position embedding too
      return jnp.zeros(shape, dtype)
    if self.kind == "zero":
      # As EAP-IG: the input node is the token embedding only (TransformerLens' `hook_embed`), so a
      # zero-ablated input edge still carries the position embedding, which is never ablated.
      zeros = jnp.zeros(shape, dtype)
      if cfg.positional != "learned":
        return zeros
      return zeros.at[:, :, 0].set(params["W_pos"][positions_of(batch.mask)].astype(dtype))
    if self.kind in ("mean", "optimal"):
      return jnp.broadcast_to(self.means.astype(dtype), shape)
    means = self.means[:P]
    if means.shape[0] < P:
      pad = jnp.zeros((P - means.shape[0],) + means.shape[1:], means.dtype)
      means = jnp.concatenate([means, pad])
    return jnp.broadcast_to(means.astype(dtype), shape)


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
      return Ablation("optimal", jnp.asarray(optimal.load_values(optimal_values, cfg)[0]))
    data = mean_dataset or dataset
    means = compute_means(cfg, params, data, batch_size)
    values, _ = optimal.learn_optimal_values(cfg, params, data, means,
                                             optimal_values or optimal.OptimalOptions())
    return Ablation("optimal", jnp.asarray(values))
  if intervention.startswith("mean"):
    means = compute_means(cfg, params, mean_dataset or dataset, batch_size,
                          positional=intervention == "mean-positional")
    return Ablation(intervention, means)
  return Ablation(intervention)
