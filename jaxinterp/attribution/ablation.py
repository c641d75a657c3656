"""What an ablated edge carries: the corrupted run (patching), zero, or the mean sender output.

An edge s -> r outside the circuit (or under attribution) makes its receiver read the sender's
ablated value instead of its clean one. `Ablation.values` gives those values for a batch; the
graph-form forward (`models.EdgePatch`) and every method take them as an explicit argument.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.attribution import base
from jaxinterp.tasks import Batch, Dataset
from models import edges as E
from models.config import ModelConfig

Array = jax.Array

INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


@flax.struct.dataclass
class Ablation:
  """Counterfactual sender values: `kind` in INTERVENTIONS, and `means` for the mean ablations.

  means: Float[Array, "sender d_model"] (mean) or Float[Array, "pos sender d_model"]
  (mean-positional), averaged over real tokens of a reference dataset.
  """

  kind: str = flax.struct.field(pytree_node=False, default="patching")
  means: Optional[Array] = None

  def values(self, cfg: ModelConfig, params, batch: Batch) -> Array:
    """The ablated sender outputs for a batch: Float[Array, "batch pos sender d_model"]."""
    B, P = batch.clean.shape
    if self.kind == "patching":
      return base.sender_outputs(cfg, params, batch.corrupted, batch.mask)
    dtype = jax.tree.leaves(params)[0].dtype
    shape = (B, P, E.n_senders(cfg), cfg.d_model)
    if self.kind == "zero":
      return jnp.zeros(shape, dtype)
    if self.kind == "mean":
      return jnp.broadcast_to(self.means.astype(dtype), shape)
    means = self.means[:P]
    if means.shape[0] < P:
      means = jnp.concatenate([means, jnp.zeros((P - means.shape[0],) + means.shape[1:], means.dtype)])
    return jnp.broadcast_to(means.astype(dtype), shape)


def compute_means(cfg: ModelConfig, params, dataset: Dataset, batch_size: int,
                  positional: bool = False) -> Array:
  """Mean sender outputs over the real tokens of `dataset`'s clean prompts.

  Returns Float[Array, "sender d_model"], or Float[Array, "pos sender d_model"] if `positional`.
  """
  fn = jax.jit(lambda p, t, m: base.sender_outputs(cfg, p, t, m))
  total, count = None, None
  for batch in dataset.batches(batch_size, bucket=None):
    acts = fn(params, batch.clean, batch.mask).astype(jnp.float32)
    w = (batch.mask & batch.valid[:, None]).astype(jnp.float32)  # [B, P]
    if positional:
      s, c = jnp.einsum("bpsd,bp->psd", acts, w), w.sum(0)
    else:
      s, c = jnp.einsum("bpsd,bp->sd", acts, w), w.sum()
    total = s if total is None else total + s
    count = c if count is None else count + c
  if positional:
    return total / jnp.maximum(count, 1.0)[:, None, None]
  return total / jnp.maximum(count, 1.0)


def make_ablation(cfg: ModelConfig, params, dataset: Dataset, intervention: str, batch_size: int,
                  mean_dataset: Optional[Dataset] = None) -> Ablation:
  """Build the `Ablation` for an intervention name (means from `mean_dataset`, default `dataset`)."""
  if intervention not in INTERVENTIONS:
    raise base.AttributionError(f"unknown intervention {intervention!r}; choose from "
                                f"{INTERVENTIONS}")
  if intervention.startswith("mean"):
    means = compute_means(cfg, params, mean_dataset or dataset, batch_size,
                          positional=intervention == "mean-positional")
    return Ablation(intervention, means)
  return Ablation(intervention)
