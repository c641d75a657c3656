"""UGS, uniform gradient sampling (Li & Janson 2024; alestolfo/optimalablation's
`edge_pruning_unif_mib.py`, the UGS entry of the MIB circuit track).

Every edge e has a parameter theta_e and a continuous mask alpha_e = sigmoid(theta_e) in [0, 1]: the
probability that the edge is kept. Each training row (an example, repeated `ugs_samples` times) gets
its own mask sample from a "smoothed Bernoulli":

    u ~ U(0, 1),   window w_e = alpha_e (1 - alpha_e)  (held constant),
    m_e = clip((alpha_e - u) / w_e + 1/2, 0, 1)

so m_e is 1 when u < alpha_e - w_e/2, 0 when u > alpha_e + w_e/2 and linear in between, with
E[m_e] ~ alpha_e. The forward carries alpha_e's gradient scaled by w_e (the reference's
scale-invariance trick: `alpha' = w alpha - (w - 1) stop_grad(alpha)`), so dm/dtheta is the same
for every alpha. Only samples inside the window carry a gradient; each edge's gradient is
reweighted by rows / (rows whose sample was strictly between 0 and 1), the mean over its informative
samples. Edges that the sampled discrete mask leaves off every input -> logits path are zeroed
(dangling-edge pruning, `masks.prune_dangling`). The loss is

    mean over rows of KL(clean || masked) at the last token  +  reg_lamb * sum_e alpha_e
    +  node_reg * sum_heads tanh(2 x_h / (L H)) (L H) / 2,

x_h the summed alpha of the edges into and out of head h (the reference's node penalty, node_reg =
min(reg_lamb / 2, 2e-4)). theta starts at 1 (alpha = 0.73) and is trained with AdamW (beta2 =
0.995, no weight decay), gradients clipped to norm 5, learning rate 0.05 for reg_lamb = 1e-3 (0.1 up
to 5e-4, 0.15 up to 1e-4), divided by 5 with counterfactual patching, as the reference sets it.

Scores: alpha_e, in [0, 1] (a probability, not in the metric's units; higher = keep). MIB used
reg_lamb = 0.001 on GPT-2 small (32491 edges). The KL term's gradient per edge grows as the graph
shrinks while the penalty's does not, so the default lambda is MIB's times 32491 / (the graph's
valid edges), doubled below GPT-2 small's size (`penalties`): 0.001 on GPT-2 small, 0.59 on the
bundled toy's 110 edges, where MIB's unscaled value leaves every alpha near 1 and the ranking to
noise (measured on the toy: 1x (0.295) keeps ten edges near 1 with a0.h3->a1.h0<k> 7th; 0.6 and
1.0 keep the six edges of the induction circuit, it 5th; 3.0 prunes everything). The learning
rate's default stays the reference's for MIB's lambda. Not modelled: the reference keeps the BOS
position clean and can also learn optimal-ablation values jointly (here `--intervention=optimal`
learns them beforehand).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.attribution import base, masks
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models.config import ModelConfig

INIT_THETA = 1.0
CLIP_NORM = 5.0
BETA2 = 0.995
MIN_WINDOW = 1e-6  # alpha = 0 or 1 in float32: the sample is then exactly 0 or 1
MIB_REG_LAMB = 1e-3  # MIB's lambda (its README), tuned on GPT-2 small
GPT2_SMALL_EDGES = 32491  # GPT-2 small's valid edges (`circuits.layout`)
NODE_REG_CAP = 2e-4  # the reference's node penalty: min(lambda / 2, 2e-4)
SMALL_GRAPH_FACTOR = 2.0  # the extra factor on the scaled lambda below GPT-2 small's size


@dataclasses.dataclass(frozen=True)
class UGSOptions(masks.MaskOptions):
  """Options of UGS (and those of every mask method, `masks.MaskOptions`).

  Attributes:
    reg_lamb: lambda of the sparsity penalty lambda * sum_e alpha_e. None (the default): MIB's
      0.001, tuned on GPT-2 small's 32491 edges, scaled by the graph's size: 0.001 * 32491 / (the
      model's valid edges), so the penalty's total weight is MIB's, times 2 below GPT-2 small's
      size (0.59 for the bundled toy's 110 edges: at 1x, 0.295, ten edges stay near alpha = 1 and
      their order is noise; at 2x the six of the induction circuit do). A value given is used as
      it is.
    ugs_samples: mask samples per example in each step (the reference: 12, with 5 examples).
    node_reg: weight of the node penalty; None: min(lambda / 2, 2e-4) as in the reference.
    prune_dangling: zero the sampled edges that are on no input -> logits path.
  """

  mask_batch: int = 5
  reg_lamb: float | None = None
  ugs_samples: int = 12
  node_reg: float | None = None
  prune_dangling: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.reg_lamb is not None:
      masks.positive_float("reg_lamb", self.reg_lamb)
    masks.positive_int("ugs_samples", self.ugs_samples)
    if self.node_reg is not None and not (isinstance(self.node_reg, (int, float))
                                          and self.node_reg >= 0):
      raise base.AttributionError(f"node_reg must be >= 0, got {self.node_reg!r}")


def graph_scale(cfg: ModelConfig) -> float:
  """The factor on MIB's lambda: GPT2_SMALL_EDGES / (valid edges), doubled for a smaller graph
  (SMALL_GRAPH_FACTOR); 1 for GPT-2 small."""
  k = GPT2_SMALL_EDGES / float(valid_edges(cfg).sum())
  return k * SMALL_GRAPH_FACTOR if k > 1 else k


def penalties(cfg: ModelConfig, options: UGSOptions) -> tuple[float, float]:
  """(lambda, node_reg) that training uses: the given values, else MIB's scaled by the graph's
  size (`graph_scale`; see `UGSOptions`)."""
  lamb = MIB_REG_LAMB * graph_scale(cfg) if options.reg_lamb is None else options.reg_lamb
  node = min(lamb / 2, NODE_REG_CAP) if options.node_reg is None else options.node_reg
  return lamb, node


def default_lr(reg_lamb: float | None, intervention: str) -> float:
  """The reference's learning rate for a lambda (None: MIB's 0.001) and an ablation type."""
  reg_lamb = MIB_REG_LAMB if reg_lamb is None else reg_lamb
  lr = 0.15 if reg_lamb <= 1e-4 else 0.1 if reg_lamb <= 5e-4 else 0.05
  return lr / 5 if intervention == "patching" else lr


def sample_masks(key, theta, n_rows: int):
  """Smoothed-Bernoulli masks [n_rows, S, R] with the reference's gradient (see the module doc)."""
  alpha = jax.nn.sigmoid(theta)
  window = jax.lax.stop_gradient(jnp.maximum(alpha * (1 - alpha), MIN_WINDOW))
  scaled = window * alpha - (window - 1) * jax.lax.stop_gradient(alpha)  # value alpha, grad * w
  u = jax.random.uniform(key, (n_rows,) + theta.shape)
  m = jnp.clip((scaled - u) / window + 0.5, 0.0, 1.0)
  inside = jnp.sum((m > 1e-3) & (m < 1 - 1e-3), 0)
  gw = jax.lax.stop_gradient(jnp.where(inside < 1, 0.0, n_rows / jnp.maximum(inside, 1)))
  return gw * m + (1 - gw) * jax.lax.stop_gradient(m)


def node_penalty(cfg: ModelConfig, alpha, valid):
  """The reference's head penalty: sum over heads of tanh(2 x_h / (L H)) (L H) / 2, x_h the summed
  alpha of the edges out of head h and into its q/k/v inputs."""
  g = Graph.from_config(cfg)
  a = jnp.where(valid, alpha, 0.0)
  heads = np.asarray([s for s in range(g.n_senders) if g.sender_names[s].startswith("a")])
  into_head = np.asarray(g.receiver_node)[None, :] == heads[:, None]  # [head, receiver]
  into = jnp.asarray(into_head, a.dtype) @ jnp.sum(a, 0)
  x = jnp.sum(a[heads], 1) + into
  LH = cfg.n_layers * cfg.n_heads
  return jnp.sum(jnp.tanh(2 * x / LH) * LH / 2)


def optimizer(lr: float) -> optax.GradientTransformation:
  """The reference's optimiser: AdamW (beta2 = 0.995, no decay) after clipping to norm 5."""
  return optax.chain(optax.clip_by_global_norm(CLIP_NORM),
                     optax.adamw(lr, b1=0.9, b2=BETA2, weight_decay=0.0))


def _masks(cfg, options: UGSOptions, theta, key, n_rows: int, own=None, size: int = 0):
  """Each row's mask sample [n_rows, S, R] (dangling edges zeroed); with `own`, the samples of
  those rows of a batch of `size` (`masks.sample_rows`), drawn as the whole batch draws them."""
  m = sample_masks(key, theta, n_rows)
  if own is not None:
    m = masks.sample_rows(m, options.ugs_samples, size, own)
  if options.prune_dangling:
    m = m * jax.lax.stop_gradient(masks.prune_dangling(cfg, m > 0).astype(m.dtype))
  return m


def _penalties(cfg, options: UGSOptions, theta):
  """The batch-independent terms of the loss, in the order they are added, and sum_e alpha_e."""
  valid = jnp.asarray(valid_edges(cfg))
  alpha = jax.nn.sigmoid(theta)
  complexity = jnp.sum(jnp.where(valid, alpha, 0.0))
  reg_lamb, node_reg = penalties(cfg, options)
  terms = [reg_lamb * complexity]
  if node_reg > 0:
    terms.append(node_reg * node_penalty(cfg, alpha, valid))
  return terms, complexity


def _row_losses(cfg, task, options: UGSOptions, params, batch, clean_last, ablated, m):
  """Per-row loss of the rows (the batch repeated `ugs_samples` times, sample-major) and the
  repeated batch."""
  rows, clean_last, ablated = masks.repeat_rows(options.ugs_samples, batch, clean_last, ablated)
  return masks.circuit_loss(cfg, task, options.mask_objective, params, rows, clean_last, ablated,
                            m), rows


def _loss(cfg, task, options: UGSOptions, params, theta, batch, clean_last, ablated, key):
  m = _masks(cfg, options, theta, key, options.ugs_samples * batch.clean.shape[0])
  kl = masks.mean_real(*_row_losses(cfg, task, options, params, batch, clean_last, ablated, m))
  terms, complexity = _penalties(cfg, options, theta)
  loss = kl
  for term in terms:
    loss = loss + term
  return loss, (kl, complexity)


@functools.partial(jax.jit, static_argnames=("cfg", "task", "options", "lr"))
def train_step(cfg, task, options: UGSOptions, lr: float, params, ablation, state, batch, key, i):
  """One UGS step on a batch: ((theta, opt_state), logs). Compiled once per model, task and
  options, so repeated `fit` calls (and the benchmark) reuse it."""
  del i
  theta, opt_state = state
  clean_last, ablated = masks.clean_and_ablated(cfg, task, params, batch, ablation)
  (loss, (kl, complexity)), g = jax.value_and_grad(_loss, argnums=4, has_aux=True)(
      cfg, task, options, params, theta, batch, clean_last, ablated, key)
  return _apply(options, lr, theta, opt_state, g,
                {"loss": loss, "kl": kl, "complexity": complexity})


def _apply(options: UGSOptions, lr: float, theta, opt_state, g, logs):
  """One AdamW step on theta with the gradient g (NaNs zeroed, as the reference does); the logs
  with the traced edges' new parameters."""
  updates, opt_state = optimizer(lr).update(jnp.nan_to_num(g), opt_state, theta)
  theta = optax.apply_updates(theta, updates)
  return (theta, opt_state), {**logs, **masks.traced(theta, options)}


@functools.partial(jax.jit, static_argnames=("cfg", "task", "options", "size"))
def split_rows(cfg, task, options: UGSOptions, params, ablation, state, part, key, own, size):
  """`masks.SplitStep.rows` of UGS: the gradient of this process's rows' summed KL (their masks as
  the whole batch of `size` draws them) and {"kl": the sum, "count": real rows x samples}."""
  clean_last, ablated = masks.clean_and_ablated(cfg, task, params, part, ablation)

  def total(theta):
    m = _masks(cfg, options, theta, key, options.ugs_samples * size, own, size)
    return masks.real_sum(*_row_losses(cfg, task, options, params, part, clean_last, ablated, m))

  (kl, count), g = jax.value_and_grad(total, has_aux=True)(state[0])
  return g, {"kl": kl, "count": count}


@functools.partial(jax.jit, static_argnames=("cfg", "options", "lr"))
def split_update(cfg, options: UGSOptions, lr: float, state, grad, means, key, i, size):
  """`masks.SplitStep.update` of UGS: the rows' mean gradient plus the penalties'; one AdamW
  step."""
  del key, i, size
  theta, opt_state = state

  def penalty(t):
    terms, complexity = _penalties(cfg, options, t)
    return sum(terms[1:], terms[0]), complexity

  (pen, complexity), g = jax.value_and_grad(penalty, has_aux=True)(theta)
  return _apply(options, lr, theta, opt_state, grad + g,
                {"loss": means["kl"] + pen, "kl": means["kl"], "complexity": complexity})


def init_state(cfg: ModelConfig, lr: float):
  """(theta, opt_state) at the start: theta = 1 on every edge."""
  theta = jnp.full(valid_edges(cfg).shape, INIT_THETA, jnp.float32)
  return theta, optimizer(lr).init(theta)


def fit(cfg: ModelConfig, params, dataset, ablation, options: UGSOptions) -> base.FitResult:
  """Train the UGS masks on `dataset`; scores are alpha = sigmoid(theta) per edge."""
  valid = valid_edges(cfg)
  lr = float(options.mask_lr or default_lr(options.reg_lamb, ablation.kind))
  static = dataclasses.replace(options, progress=False, mask_steps=1, seed=0, mask_lr=None)
  step = functools.partial(train_step, cfg, dataset.task, static, lr, params, ablation)
  split = masks.SplitStep(
      functools.partial(split_rows, cfg, dataset.task, static, params, ablation),
      functools.partial(split_update, cfg, static, lr))
  (theta, _), history = masks.train(step, split, init_state(cfg, lr), dataset, options, "UGS")
  alpha = np.asarray(jax.nn.sigmoid(theta), np.float32)
  return base.FitResult(np.where(valid, alpha, 0.0), masks.clean_mean(cfg, params, dataset),
                        {"theta": np.asarray(theta), "lr": lr, **history})


UGS = base.Method(
    "UGS", "uniform gradient sampling (MIB): a continuous mask alpha in [0, 1] per edge trained to "
    "keep KL to the clean model low under a sparsity penalty; score = alpha", None, UGSOptions,
    fit=fit, convention="loss")
