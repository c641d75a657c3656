"""`--memory_budget` (`IGOptions.memory_budget`) for the receiver-gradient kernel (EAP,
EAP-IG-inputs, clean-corrupted and EAP-IG-activations): how many groups of rows, and how large the
contraction's position chunks, so that the kernel's planned temporaries fit.

`receiver_grads.ig_inputs_batch(..., row_chunks, chunk_bytes)` scores the groups of rows one after
another in a `lax.scan` (their temporaries share buffers) and sums their scores: the same sums
regrouped, so the scores equal the unbudgeted ones to float rounding (docs/performance.md, "Memory
plans"). A row is the smallest chunk: its forward needs all of its positions.

When one row does not fit but does rematerialised (`jax.checkpoint` of each block: the backward
recomputes a block's activations instead of keeping every layer's), `inputs_plan` turns `remat` on
(`BudgetPlan.auto_remat`; the kernels print one `note:` line): same scores to float rounding, more
compute. Only a budget below a remat'd row is refused.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from jaxinterp.attribution import base
from jaxinterp.attribution import contraction as C
from jaxinterp.attribution.base import AttributionError
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import sizes


class MemoryBudgetError(AttributionError):
  """A `--memory_budget` below the smallest chunk the kernel can run (one row of the batch);
  `least`: the bytes one row needs (planned)."""

  least: float = 0.0


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
  """How a kernel runs under a `--memory_budget`.

  Attributes:
    row_chunks: groups of rows, scored one after another (a divisor of the batch).
    chunk_bytes: the contraction's position chunks.
    remat: whether the kernel runs rematerialised (asked for, or chosen by the budget).
    auto_remat: remat was chosen by the budget (one row fits only rematerialised).
  """

  row_chunks: int
  chunk_bytes: float
  remat: bool
  auto_remat: bool = False

  def note(self, method: str, budget: str) -> str | None:
    """The `note:` line of a remat the budget chose (None otherwise)."""
    if not self.auto_remat:
      return None
    return (f"note: --memory_budget={budget}: one row of the batch fits only rematerialised, so "
            f"{method} runs with --remat (same scores to float rounding, more compute)")


_NOTED: set[str] = set()  # the notes printed since `start_run`


def start_run() -> None:
  """Forget the notes of earlier runs in this process: a pipeline calls it first, so that each
  run prints its notes once and `remat_chosen` is about that run alone."""
  _NOTED.clear()


def remat_chosen() -> bool:
  """Whether a budget turned remat on in the run since `start_run` (for its `meta`: the options
  record `remat` as given)."""
  return bool(_NOTED)


def print_note(plan: BudgetPlan, method: str, budget: str) -> None:
  """Print `plan.note` to stderr, once per run and message (the kernel runs per batch)."""
  line = plan.note(method, budget)
  if line is not None and line not in _NOTED:
    _NOTED.add(line)
    print(line, file=sys.stderr, flush=True)


def _temp_bytes(cfg: ModelConfig, params, rows: int, n_pos: int, n_steps: int, remat: bool,
                chunk_bytes: float, interpolate: str = "inputs") -> float:
  """Planned temporaries of `receiver_grads.ig_inputs_batch` on `rows` rows of `n_pos` positions
  (one group), interpolating the "inputs" or the layers' "activations" (EAP-IG-activations).

  Per position, in float32: the sender differences [S, d], the head gradients and q/k/v
  ([L, 3H, d_head], three of them), the MLP and logits gradients and the norm's inputs ([L, d],
  three), and one IG step's forward and backward activations (per layer the residual stream and
  norms, MLP hidden units and the attention pattern: `10 d + 3 d_mlp + 2 H pos`, twice). Fixed: two
  float32 copies of the blocks' weights (ungrouped GQA heads and the scan's stacked copy), the
  contraction's position chunk (twice `chunk_bytes` at most) and the [S, R] accumulators. `n_steps`
  does not enter (the steps run one after the other). Interpolating the activations adds, per
  position, the clean and corrupted layer outputs the steps blend (`_blend_words`). With `remat`,
  `_remat_temp_bytes`. Checked against `memory_analysis` in tests/attribution/test_memory_budget.py.
  """
  del n_steps
  if remat:
    return _remat_temp_bytes(cfg, params, rows, n_pos, interpolate)
  L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
  S, R = E.n_senders(cfg), E.n_receivers(cfg)
  block = base.block_floats_per_position(cfg, n_pos)
  words = S * d + 3 * L * 3 * H * dh + 3 * L * d + 2 * L * block
  words += _blend_words(cfg, interpolate)
  per_pos_contract = (L * (3 * H + 1) + 1) * d * 4
  contract = 2 * min(chunk_bytes, rows * n_pos * per_pos_contract)
  return 4.0 * words * rows * n_pos + contract + 2 * 4.0 * _block_size(cfg, params) + 8.0 * S * R


def _blend_words(cfg: ModelConfig, interpolate: str) -> int:
  """Per position: the clean and corrupted runs' layer outputs EAP-IG-activations' steps blend
  (`receiver_grads.LAYER_OUTPUTS`: z [H, d_head] and the MLP's output [d] per layer, two runs); 0
  for the inputs."""
  if interpolate == "inputs":
    return 0
  return 2 * cfg.n_layers * (cfg.n_heads * cfg.d_head + cfg.d_model)


def _remat_temp_bytes(cfg: ModelConfig, params, rows: int, n_pos: int,
                      interpolate: str = "inputs") -> float:
  """Planned temporaries of `receiver_grads.ig_inputs_batch(..., remat=True)` (its per-head-input
  kernel) on `rows` rows of `n_pos` positions.

  Per position, in float32: the clean and ablated senders and their difference ([S, d], three), the
  per-head-input receiver gradients ([L, 3H + 2, d]: the steps' sum, a step's and their receiver
  layout), the embeddings (three [d]) and the full logits with their gradient and the clean ones
  ([V], three); then one IG step under remat keeps each block's input ([L, d], and its gradient)
  and recomputes one block at a time: that block's activations and their gradients (the per-head
  inputs `3 H d`, `10 d + 3 d_mlp + 2 H pos`, twice), not every layer's. Fixed: a float32 copy of
  the blocks' weights and the [S, R] accumulators (no GQA ungrouping, no stacked copy).
  """
  L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
  S, R = E.n_senders(cfg), E.n_receivers(cfg)
  words = 3 * S * d + 3 * L * (3 * H + 2) * d + 3 * d + 3 * cfg.d_vocab + 2 * L * d
  block = base.block_floats_per_position(cfg, n_pos)
  words += 2 * (3 * H * d + block) + _blend_words(cfg, interpolate)
  return 4.0 * words * rows * n_pos + 4.0 * _block_size(cfg, params) + 8.0 * S * R


def _block_size(cfg: ModelConfig, params) -> int:
  """Elements of the blocks' weights."""
  return sum(x.size for li in range(cfg.n_layers) for x in jax.tree.leaves(params[f"blocks_{li}"]))


def _parse(budget: str) -> float:
  try:
    return sizes.parse_bytes(budget, "memory_budget")
  except sizes.SizeError as e:
    raise MemoryBudgetError(str(e)) from None


def _fewest_groups(b: int, p: int, budget: str, total: float, fits, remat: bool = False,
                   data_shards: int = 1) -> int:
  """The fewest groups of rows with `fits(rows a device holds in a group, total)`: a divisor of
  the rows each of the `data_shards` devices holds (`contraction.group_rows`); MemoryBudgetError,
  naming the least budget for one row, when none does (`fits` is monotone in the budget)."""
  local = b // data_shards
  for chunks in (c for c in range(1, local + 1) if local % c == 0):
    if fits(local // chunks, total):
      return chunks
  lo, hi = total, 2 * total  # the least budget for one row
  while not fits(1, hi):
    lo, hi = hi, 2 * hi
  while hi - lo > max(1.0, 1e-4 * hi):
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if fits(1, mid) else (mid, hi)
  least = sizes.round_up(hi)
  e = MemoryBudgetError(
      f"--memory_budget={budget} is below the smallest chunk: one row of {p} positions needs "
      f"{least} of temporaries (planned{', rematerialised' if remat else ''}); give at least "
      f"--memory_budget={least}")
  e.least = hi
  raise e


def row_chunks(cfg: ModelConfig, params, batch_shape: tuple[int, int], n_steps: int, budget: str,
               remat: bool = False, data_shards: int = 1,
               interpolate: str = "inputs") -> tuple[int, float]:
  """(row_chunks, chunk_bytes) of `receiver_grads.ig_inputs_batch` whose planned temporaries
  (`_temp_bytes`) fit the `--memory_budget` size `budget` (e.g. "2GB") on each device: the fewest
  groups of rows (a divisor of the batch, or with the rows split over `data_shards` devices, of the
  rows a device holds), and contraction chunks of at most budget / 16 (`contraction.CHUNK_BYTES` at
  most). MemoryBudgetError, naming the smallest budget that works, when one row does not fit."""
  b, p = batch_shape
  total = _parse(budget)

  def fits(rows: int, limit: float) -> bool:
    chunk_bytes = min(C.CHUNK_BYTES, limit / 16)
    return _temp_bytes(cfg, params, rows, p, n_steps, remat, chunk_bytes, interpolate) <= limit

  return (_fewest_groups(b, p, budget, total, fits, remat, data_shards),
          min(C.CHUNK_BYTES, total / 16))


def inputs_plan(cfg: ModelConfig, params, batch_shape: tuple[int, int], n_steps: int, budget: str,
                remat: bool = False, data_shards: int = 1,
                interpolate: str = "inputs") -> BudgetPlan:
  """`row_chunks`, with remat chosen when one row fits only rematerialised (`remat` given: kept).
  MemoryBudgetError, naming the least budget of a remat'd row, when even that does not fit."""
  return _with_auto_remat(lambda r: row_chunks(cfg, params, batch_shape, n_steps, budget, r,
                                               data_shards, interpolate), remat)


def _with_auto_remat(plan, remat: bool) -> BudgetPlan:
  """`plan(remat)` -> (row_chunks, chunk_bytes) as a BudgetPlan; without `remat`, on a
  MemoryBudgetError, `plan(True)`; if that fails too, the error naming the smaller least budget."""
  if remat:
    return BudgetPlan(*plan(True), remat=True)
  try:
    return BudgetPlan(*plan(False), remat=False)
  except MemoryBudgetError as plain:
    try:
      return BudgetPlan(*plan(True), remat=True, auto_remat=True)
    except MemoryBudgetError as rematted:  # name the smaller least (remat's, as a rule)
      raise (rematted if rematted.least <= plain.least else plain) from None
