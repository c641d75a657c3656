"""`--memory_budget` (`IGOptions.memory_budget`) for EAP-IG-inputs' kernel: how many groups of
rows, and how large the contraction's position chunks, so that the kernel's planned temporaries fit;
and for EAP-IG-activations' kernel: how many groups of rows (`activations_row_chunks`).

`receiver_grads.ig_inputs_batch(..., row_chunks, chunk_bytes)` scores the groups of rows one after
another in a `lax.scan` (their temporaries share buffers) and sums their scores (EAP-IG-activations'
`_ig_activations_batch(..., row_chunks)` likewise): the same sums regrouped, so the scores equal
the unbudgeted ones to float rounding (docs/performance.md, "Memory plans"). A row is the smallest
chunk: its forward needs all of its positions.
"""

from __future__ import annotations

import jax

from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.attribution.base import AttributionError
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import sizes


class MemoryBudgetError(AttributionError):
  """A `--memory_budget` below the smallest chunk the kernel can run (one row of the batch)."""


def _temp_bytes(cfg: ModelConfig, params, rows: int, n_pos: int, n_steps: int, remat: bool,
                chunk_bytes: float) -> float:
  """Planned temporaries of `RG.ig_inputs_batch` on `rows` rows of `n_pos` positions (one group).

  Per position, in float32: the sender differences [S, d], the head gradients and q/k/v
  ([L, 3H, d_head], three of them), the MLP and logits gradients and the norm's inputs ([L, d],
  three), and one IG step's forward and backward activations (per layer the residual stream and
  norms, MLP hidden units and the attention pattern: `10 d + 3 d_mlp + 2 H pos`, twice). Fixed: two
  float32 copies of the blocks' weights (ungrouped GQA heads and the scan's stacked copy), the
  contraction's position chunk (twice `chunk_bytes` at most) and the [S, R] accumulators. `n_steps`
  does not enter (the steps run one after the other). With `remat`, the per-head-input receiver
  gradients ([L, 3H + 2, d], a sum and a step's) instead of the fused kernel's. Checked against
  `memory_analysis` in tests/attribution/test_memory_budget.py.
  """
  del n_steps
  L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
  S, R = E.n_senders(cfg), E.n_receivers(cfg)
  words = S * d + 3 * L * 3 * H * dh + 3 * L * d + 2 * L * (10 * d + 3 * cfg.d_mlp + 2 * H * n_pos)
  if remat:
    words += 2 * L * (3 * H + 2) * d
  per_pos_contract = (L * (3 * H + 1) + 1) * d * 4
  contract = 2 * min(chunk_bytes, rows * n_pos * per_pos_contract)
  blocks = sum(x.size for li in range(L) for x in jax.tree.leaves(params[f"blocks_{li}"]))
  return 4.0 * words * rows * n_pos + contract + 2 * 4.0 * blocks + 2 * 4.0 * S * R


def _activations_temp_bytes(cfg: ModelConfig, params, rows: int, n_pos: int, remat: bool) -> float:
  """Planned temporaries of `ig_activations._ig_activations_batch` on `rows` rows of `n_pos`
  positions (one group).

  Per position, in float32: the fixed sender values (ablated, clean and their difference, [S, d]
  each), the clean and corrupted layer outputs it interpolates (`[L, H + 1, d]`, two), the
  embeddings and the logits (clean and a step's, [V] each), and one IG step's forward and backward
  through the graph-form model (per layer the per-head q/k/v inputs and their edge corrections
  `[3H, d]`, two, the residual stream and norms, MLP hidden units and the attention pattern:
  `6 H d + 10 d + 3 d_mlp + 4 H pos`; with `remat` two more `[3H, d]`, as the recomputed blocks'
  inputs). Fixed: a float32 copy of the blocks' weights and the [S, R] gradient and accumulator.
  The steps (and the layer nodes) run one after the other, so their number does not enter. Checked
  against `memory_analysis` in tests/attribution/test_memory_budget.py.
  """
  L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
  S, R = E.n_senders(cfg), E.n_receivers(cfg)
  words = 3 * S * d + 2 * L * (H + 1) * d + 2 * d + 2 * cfg.d_vocab
  words += L * (6 * H * d + 10 * d + 3 * cfg.d_mlp + 4 * H * n_pos)
  if remat:
    words += L * 6 * H * d
  blocks = sum(x.size for li in range(L) for x in jax.tree.leaves(params[f"blocks_{li}"]))
  return 4.0 * words * rows * n_pos + 4.0 * blocks + 2 * 4.0 * S * R


def _parse(budget: str) -> float:
  try:
    return sizes.parse_bytes(budget, "memory_budget")
  except sizes.SizeError as e:
    raise MemoryBudgetError(str(e)) from None


def _fewest_groups(b: int, p: int, budget: str, total: float, fits) -> int:
  """The fewest groups of rows (a divisor of `b`) with `fits(rows, total)`; MemoryBudgetError,
  naming the least budget for one row, when none does (`fits` is monotone in the budget)."""
  for chunks in (c for c in range(1, b + 1) if b % c == 0):
    if fits(b // chunks, total):
      return chunks
  lo, hi = total, 2 * total  # the least budget for one row
  while not fits(1, hi):
    lo, hi = hi, 2 * hi
  while hi - lo > max(1.0, 1e-4 * hi):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if fits(1, mid) else (mid, hi)
  least = sizes.round_up(hi)
  raise MemoryBudgetError(
      f"--memory_budget={budget} is below the smallest chunk: one row of {p} positions needs "
      f"{least} of temporaries (planned); give at least --memory_budget={least}")


def row_chunks(cfg: ModelConfig, params, batch_shape: tuple[int, int], n_steps: int, budget: str,
               remat: bool = False) -> tuple[int, float]:
  """(row_chunks, chunk_bytes) of `RG.ig_inputs_batch` whose planned temporaries (`_temp_bytes`)
  fit the `--memory_budget` size `budget` (e.g. "2GB"): the fewest groups of rows (a divisor of
  the batch), and contraction chunks of at most budget / 16 (RG.CHUNK_BYTES at most).
  MemoryBudgetError, naming the smallest budget that works, when one row does not fit."""
  b, p = batch_shape
  total = _parse(budget)

  def fits(rows: int, limit: float) -> bool:
    chunk_bytes = min(RG.CHUNK_BYTES, limit / 16)
    return _temp_bytes(cfg, params, rows, p, n_steps, remat, chunk_bytes) <= limit

  return _fewest_groups(b, p, budget, total, fits), min(RG.CHUNK_BYTES, total / 16)


def activations_row_chunks(cfg: ModelConfig, params, batch_shape: tuple[int, int], n_steps: int,
                           budget: str, remat: bool = False) -> int:
  """The row_chunks of EAP-IG-activations' kernel (`ig_activations._ig_activations_batch`) whose
  planned temporaries (`_activations_temp_bytes`) fit the `--memory_budget` size `budget`: the
  fewest groups of rows (a divisor of the batch). Its graph-form forward needs a row's positions
  and its IG steps already run one after the other, so a row is the smallest chunk;
  MemoryBudgetError, naming the smallest budget that works, when one row does not fit."""
  del n_steps  # the steps share one step's temporaries
  b, p = batch_shape
  total = _parse(budget)

  def fits(rows: int, limit: float) -> bool:
    return _activations_temp_bytes(cfg, params, rows, p, remat) <= limit

  return _fewest_groups(b, p, budget, total, fits)
