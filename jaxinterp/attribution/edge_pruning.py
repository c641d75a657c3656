"""Edge Pruning (Bhaskar et al. 2024, "Finding transformer circuits with edge pruning";
princeton-nlp/Edge-Pruning): hard-concrete (L0) edge masks trained to a target sparsity.

Every edge e has a log_alpha_e; each step samples one mask for the batch from the hard-concrete
distribution (Louizos et al. 2018) with temperature beta = 2/3 stretched to (l, r) = (-0.1, 1.1):

    u ~ U(eps, 1 - eps),   s_e = sigmoid((log u - log(1 - u) + log_alpha_e) / beta),
    z_e = clip(l + (r - l) s_e, 0, 1),

so z_e is exactly 0 or 1 with positive probability and differentiable in between. With the model's
sparsity S(z) = 1 - sum_e z_e / n_edges and the scheduled target t_k, the loss is the Lagrangian

    KL(clean || masked) at the last token  +  lambda_1 (S - t_k) + lambda_2 (S - t_k)^2,

minimised over log_alpha and maximised over lambda_1, lambda_2 (gradient ascent), which holds S at
t_k. The target rises linearly from `start_sparsity` to `sparsity` over the first 5/6 of the steps
(the reference's 2500 of 3000), then stays. log_alpha starts at 10 (every edge on), lambdas at 0;
AdamW (weight decay 0.01, torch's default) at learning rate 0.8 for both, warmed up over the first
1/15 of the steps and decayed linearly to 0, as the reference's IOI sweep runs it.

`init_from=graph.json` warm-starts from another method's scores (EAP-IG's, as the best entry of the
BlackboxNLP 2025 MIB shared task did): log_alpha_e = init_logit * rank_e, linear in the rank of
|score_e| from 0 (the last edge) to init_logit (the top edge), so the edges EAP-IG ranks low are the
first the sparsity pressure removes.

Scores: P(z_e > 0) = sigmoid(log_alpha_e - beta log(-l / r)), the probability that the edge is kept,
in [0, 1] (not in the metric's units). `extras["circuit"]` is the circuit at the requested sparsity:
the round((1 - sparsity) * n_edges) edges with the highest log_alpha. Not modelled: the reference's
optional node (writer) masks and their own Lagrangian (its IOI sweep disables the node loss).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.attribution import base, masks
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models.config import ModelConfig

LEFT, RIGHT, BETA, EPS = -0.1, 1.1, 2 / 3, 1e-6
WARMUP_FRACTION = 2500 / 3000  # target-sparsity warmup, of the steps
LR_WARMUP_FRACTION = 200 / 3000
WEIGHT_DECAY = 0.01


@dataclasses.dataclass(frozen=True)
class EdgePruningOptions(masks.MaskOptions):
  """Options of Edge Pruning (and those of every mask method, `masks.MaskOptions`).

  Attributes:
    sparsity: the target fraction of edges removed, in (0, 1).
    start_sparsity: the target at step 0, in [0, sparsity].
    init_from: an EAP-IG-format graph.json whose |scores| warm-start log_alpha (see the module doc).
    init_logit: log_alpha of every edge at the start (the top edge's with `init_from`).
    sparsity_warmup: steps over which the target rises; None: 5/6 of `mask_steps`.
    lambda_lr: learning rate of the Lagrange multipliers; None: `mask_lr` (as the reference).
    ep_samples: mask samples per example in a step. 1 (the reference): one mask for the whole
      batch; more: every row (example x sample) gets its own mask, as UGS does (less variance).
  """

  mask_batch: int = 32
  sparsity: float = 0.95
  start_sparsity: float = 0.0
  init_from: str | None = None
  init_logit: float = 10.0
  sparsity_warmup: int | None = None
  lambda_lr: float | None = None
  ep_samples: int = 1

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
        or not 0 < self.sparsity < 1:
      raise base.AttributionError(f"sparsity must be in (0, 1) (the fraction of edges removed), "
                                  f"got {self.sparsity!r}")
    if not (isinstance(self.start_sparsity, (int, float))
            and 0 <= self.start_sparsity <= self.sparsity):
      raise base.AttributionError(f"start_sparsity must be in [0, sparsity={self.sparsity}], got "
                                  f"{self.start_sparsity!r}")
    if self.sparsity_warmup is not None:
      masks.positive_int("sparsity_warmup", self.sparsity_warmup)
    if self.init_from is not None and not isinstance(self.init_from, str):
      raise base.AttributionError(f"init_from must be a path to a graph.json, got "
                                  f"{self.init_from!r}")
    masks.positive_float("init_logit", self.init_logit)
    if self.lambda_lr is not None:
      masks.positive_float("lambda_lr", self.lambda_lr)
    masks.positive_int("ep_samples", self.ep_samples)


def warmup_steps(options: EdgePruningOptions) -> int:
  """Steps over which the target sparsity rises."""
  if options.sparsity_warmup is not None:
    return options.sparsity_warmup
  return max(1, int(round(options.mask_steps * WARMUP_FRACTION)))


def target_sparsity(step, options: EdgePruningOptions):
  """The target at `step`: linear from `start_sparsity` to `sparsity` over `warmup_steps`, then flat
  (the reference's "linear" warmup). Works on ints and traced arrays."""
  frac = jnp.minimum(step / warmup_steps(options), 1.0)
  return options.start_sparsity + (options.sparsity - options.start_sparsity) * frac


def sample_z(key, log_alpha, n: int | None = None):
  """One hard-concrete sample per edge, in [0, 1] (see the module doc); with `n`, n samples
  [n, S, R]."""
  shape = log_alpha.shape if n is None else (n,) + log_alpha.shape
  u = jax.random.uniform(key, shape, minval=EPS, maxval=1 - EPS)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
  return jnp.clip(LEFT + (RIGHT - LEFT) * s, 0.0, 1.0)


def keep_probability(log_alpha):
  """P(z > 0) = 1 - CDF(0): the score, in [0, 1]."""
  return jax.nn.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def initial_log_alpha(cfg: ModelConfig, options: EdgePruningOptions) -> np.ndarray:
  """init_logit everywhere, or linear in the rank of |score| of `init_from` (0 .. init_logit)."""
  valid = valid_edges(cfg)
  if options.init_from is None:
    return np.full(valid.shape, options.init_logit, np.float32)
  return (options.init_logit * masks.warm_start_ranks(cfg, options.init_from)).astype(np.float32)


def circuit_at(log_alpha: np.ndarray, valid: np.ndarray, sparsity: float) -> np.ndarray:
  """Bool [S, R]: the round((1 - sparsity) * n_edges) valid edges with the highest log_alpha."""
  n = int(round((1 - sparsity) * valid.sum()))
  order = np.argsort(-np.where(valid, log_alpha, -np.inf), axis=None, kind="stable")[:n]
  out = np.zeros(valid.size, bool)
  out[order] = True
  return out.reshape(valid.shape) & valid


def optimizer(options: EdgePruningOptions) -> optax.GradientTransformation:
  """AdamW (weight decay 0.01) on log_alpha and on the multipliers, each at its learning rate,
  warmed up over the first 1/15 of the steps and then decayed linearly to 0 (the reference's)."""
  lr = options.mask_lr or 0.8
  n_warm = max(1, int(round(options.mask_steps * LR_WARMUP_FRACTION)))

  def adamw(peak):
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, n_warm),
         optax.linear_schedule(peak, 0.0, max(1, options.mask_steps - n_warm))], [n_warm])
    return optax.adamw(schedule, weight_decay=WEIGHT_DECAY)

  return optax.multi_transform({"mask": adamw(lr), "lambda": adamw(options.lambda_lr or lr)},
                               {"log_alpha": "mask", "lambda_1": "lambda", "lambda_2": "lambda"})


def _sample(options: EdgePruningOptions, log_alpha, key, size: int):
  """The step's mask samples for a batch of `size`: one [S, R] for the batch (ep_samples = 1), or
  one per row [ep_samples * size, S, R], sample-major."""
  if options.ep_samples == 1:
    return sample_z(key, log_alpha)
  return sample_z(key, log_alpha, options.ep_samples * size)


def _row_losses(cfg, task, options: EdgePruningOptions, params, batch, clean_last, ablated, z):
  """Per-row loss of the batch (repeated `ep_samples` times, sample-major, if z is per row) under
  the samples z, and the (repeated) batch."""
  if z.ndim == 3:
    batch, clean_last, ablated = masks.repeat_rows(options.ep_samples, batch, clean_last, ablated)
  w = jnp.where(jnp.asarray(valid_edges(cfg)), z, 1.0)
  return masks.circuit_loss(cfg, task, options.mask_objective, params, batch, clean_last, ablated,
                            w), batch


def _lagrangian(cfg, theta, z, target):
  """The batch-independent terms: lambda_1 (S - t) and lambda_2 (S - t)^2, S = the samples' mean
  sparsity; and S."""
  valid = jnp.asarray(valid_edges(cfg))
  kept = jnp.mean(jnp.sum(jnp.where(valid, z, 0.0), (-2, -1)))
  sparsity = 1.0 - kept / float(np.sum(valid_edges(cfg)))
  gap = sparsity - target
  return [theta["lambda_1"] * gap, theta["lambda_2"] * gap ** 2], sparsity


def _loss(cfg, task, options: EdgePruningOptions, params, theta, batch, clean_last, ablated, key,
          target):
  z = _sample(options, theta["log_alpha"], key, batch.clean.shape[0])
  kl = masks.mean_real(*_row_losses(cfg, task, options, params, batch, clean_last, ablated, z))
  (first, second), sparsity = _lagrangian(cfg, theta, z, target)
  return kl + first + second, (kl, sparsity)


def _ascend(g):
  """Descent on log_alpha, ascent on the multipliers."""
  return {"log_alpha": g["log_alpha"], "lambda_1": -g["lambda_1"], "lambda_2": -g["lambda_2"]}


def _apply(options: EdgePruningOptions, theta, opt_state, g, logs):
  updates, opt_state = optimizer(options).update(_ascend(g), opt_state, theta)
  theta = optax.apply_updates(theta, updates)
  return (theta, opt_state), {**logs, "lambda_1": theta["lambda_1"],
                              "lambda_2": theta["lambda_2"],
                              **masks.traced(theta["log_alpha"], options)}


@functools.partial(jax.jit, static_argnames=("cfg", "task", "options"))
def train_step(cfg, task, options: EdgePruningOptions, params, ablation, state, batch, key, i):
  """One Edge Pruning step on a batch at step index i: ((theta, opt_state), logs). Descends on
  log_alpha, ascends on the multipliers. Compiled once per model, task and options."""
  theta, opt_state = state
  target = target_sparsity(i, options)
  clean_last, ablated = masks.clean_and_ablated(cfg, task, params, batch, ablation)
  (loss, (kl, sparsity)), g = jax.value_and_grad(_loss, argnums=4, has_aux=True)(
      cfg, task, options, params, theta, batch, clean_last, ablated, key, target)
  return _apply(options, theta, opt_state, g,
                {"loss": loss, "kl": kl, "sparsity": sparsity, "target": target})


@functools.partial(jax.jit, static_argnames=("cfg", "task", "options", "size"))
def split_rows(cfg, task, options: EdgePruningOptions, params, ablation, state, part, key, own,
               size):
  """`masks.SplitStep.rows` of Edge Pruning: the gradient of this process's rows' summed KL (their
  samples as the whole batch of `size` draws them) and {"kl": the sum, "count": real rows}."""
  clean_last, ablated = masks.clean_and_ablated(cfg, task, params, part, ablation)

  def total(theta):
    z = _sample(options, theta["log_alpha"], key, size)
    if z.ndim == 3:
      z = masks.sample_rows(z, options.ep_samples, size, own)
    return masks.real_sum(*_row_losses(cfg, task, options, params, part, clean_last, ablated, z))

  (kl, count), g = jax.value_and_grad(total, has_aux=True)(state[0])
  return g, {"kl": kl, "count": count}


@functools.partial(jax.jit, static_argnames=("cfg", "options", "size"))
def split_update(cfg, options: EdgePruningOptions, state, grad, means, key, i, size: int):
  """`masks.SplitStep.update` of Edge Pruning: the rows' mean gradient plus the Lagrangian's (its
  sparsity from the whole batch's samples), one AdamW step."""
  theta, opt_state = state
  target = target_sparsity(i, options)

  def lagrangian(t):
    z = _sample(options, t["log_alpha"], key, size)
    (first, second), sparsity = _lagrangian(cfg, t, z, target)
    return first + second, sparsity

  (pen, sparsity), g = jax.value_and_grad(lagrangian, has_aux=True)(theta)
  return _apply(options, theta, opt_state, jax.tree.map(jnp.add, grad, g),
                {"loss": means["kl"] + pen, "kl": means["kl"], "sparsity": sparsity,
                 "target": target})


def init_state(cfg: ModelConfig, options: EdgePruningOptions):
  """(theta, opt_state) at the start: log_alpha (`initial_log_alpha`) and multipliers at 0."""
  theta = {"log_alpha": jnp.asarray(initial_log_alpha(cfg, options)),
           "lambda_1": jnp.zeros(()), "lambda_2": jnp.zeros(())}
  return theta, optimizer(options).init(theta)


def fit(cfg: ModelConfig, params, dataset, ablation, options: EdgePruningOptions) -> base.FitResult:
  """Train the hard-concrete masks; scores = P(z > 0), extras["circuit"] at the target sparsity."""
  valid = valid_edges(cfg)
  static = dataclasses.replace(options, progress=False, seed=0, init_from=None)
  step = functools.partial(train_step, cfg, dataset.task, static, params, ablation)
  split = masks.SplitStep(
      functools.partial(split_rows, cfg, dataset.task, static, params, ablation),
      functools.partial(split_update, cfg, static))
  (theta, _), history = masks.train(step, split, init_state(cfg, options), dataset, options,
                                    "edge pruning")
  log_alpha = np.asarray(theta["log_alpha"], np.float32)
  scores = np.where(valid, np.asarray(keep_probability(log_alpha)), 0.0)
  return base.FitResult(scores, masks.clean_mean(cfg, params, dataset),
                        {"circuit": circuit_at(log_alpha, valid, options.sparsity),
                         "log_alpha": log_alpha, "lr": options.mask_lr or 0.8, **history})


EDGE_PRUNING = base.Method(
    "edge-pruning", "Edge Pruning: hard-concrete (L0) edge masks trained to a target --sparsity "
    "under a Lagrangian, keeping KL to the clean model low; score = P(edge kept)", None,
    EdgePruningOptions, fit=fit, convention="loss")
