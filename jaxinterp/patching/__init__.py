"""Activation-patching sweeps (TransformerLens `patching` style), vectorised with `jax.vmap`.

A sweep patches one component at a time, e.g. the residual stream before layer l at position p, with
its value from the other run, and records the task metric. Every (layer, index) cell of a sweep is
one patched forward; the cells are evaluated by `jax.vmap` over a one-hot index inside one compiled
call (in chunks of `chunk` cells to bound memory), never by a Python loop of forwards.

Direction:

* `"noising"` (default): run the *clean* prompt and patch in the *corrupted* run's activation. A
  cell near 0 means the component carries the clean behaviour (knocking it out destroys it).
* `"denoising"` (TransformerLens' `get_act_patch_*` default): run the *corrupted* prompt and patch
  in the *clean* activation. A cell near 1 means the component alone restores the behaviour.

Both are normalised like TransformerLens' patching demos:

    normalized = (m_patched - m_corrupted) / (m_clean - m_corrupted)

where each m is the mean of the task's per-example metric over the dataset (the task's labels are
the clean answers in both directions). So 1 is the clean model's behaviour and 0 the corrupted
run's. For example, noising `resid_pre` of layer 0 at every position gives exactly the corrupted run
(0).

Sweeps (`SWEEPS`), each a grid `[n_layers, ...]`:

| name               | site                           | grid                           |
|--------------------|--------------------------------|--------------------------------|
| `resid_pre`        | `blocks.{l}.hook_resid_pre`    | layer x position               |
| `attn_out`         | `blocks.{l}.hook_attn_out`     | layer x position               |
| `mlp_out`          | `blocks.{l}.hook_mlp_out`      | layer x position               |
| `head_out`         | `blocks.{l}.attn.hook_z`       | layer x head (all positions)   |
| `head_out_by_pos`  | `blocks.{l}.attn.hook_z`       | layer x position x head        |
| `head_q`           | `blocks.{l}.attn.hook_q`       | layer x head                   |
| `head_k`, `head_v` | `blocks.{l}.attn.hook_k/v`     | layer x kv head (GQA: fewer)   |
| `head_pattern`     | `blocks.{l}.attn.hook_pattern` | layer x head                   |

Positions: batches are built with `Dataset.batches(batch_size, bucket=None)`, so every batch has the
dataset's full width P and a position sweep has P columns. Rows are aligned at their positions
(position p is token p of every prompt, BOS included; a corrupted prompt of another length was
fitted to its clean one when the data loaded, as EAP-IG and MIB align them). For a row shorter
than P, patching a position past its last real token cannot change its metric (attention is
causal and the metric is read at the last real token), so such cells measure only the longer
rows. Use prompts of one length (e.g. a template task) for clean per-position maps.

Modules:
- `sweeps`: the sweeps themselves: the `SWEEPS` registry, `run_sweep` (the cells vmapped over a
  one-hot index in compiled chunks), `baselines`, `patched_metric` (a one-forward reference) and
  `PatchingResult`;
- `pipeline`: `activation_patching(PatchingConfig(...), out)`, the pipeline of
  `experiments/activation_patching.py`: it loads the model and data, runs the sweeps and writes
  their heatmaps and arrays. Imported on its own (`from jaxinterp.patching import pipeline`): it
  draws with matplotlib, which the sweeps' users (e.g. `--dry_run`'s plans, which every binary
  imports) need not load.
"""

from __future__ import annotations

from jaxinterp.patching import sweeps
from jaxinterp.patching.sweeps import (
    DEFAULT_SWEEPS,
    DIRECTIONS,
    SWEEPS,
    OneHotPatch,
    PatchingError,
    PatchingResult,
    Sweep,
    baselines,
    get_sweep,
    patched_metric,
    run_sweep,
)

__all__ = [
    "DEFAULT_SWEEPS", "DIRECTIONS", "SWEEPS", "OneHotPatch", "PatchingError", "PatchingResult",
    "Sweep", "baselines", "get_sweep", "patched_metric", "run_sweep", "sweeps",
]
