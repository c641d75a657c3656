r"""Training the bundled toy model (`experiments/train_toy_model.py`'s pipeline): a 2-layer
GPT-2-style transformer that forms induction heads.

The model is trained with optax on rows `BOS u.. r_1..r_n w.. r_1..r_n v..` of distinct random
tokens in which a block `r` of random length n <= `seq_len` repeats after a random prefix `u` and a
random gap `w` (filler `v` completes the row), with the next-token cross-entropy on the second copy
only. Because the position of the repeat and the distance between the copies vary, no positional
shortcut works and the model learns the textbook circuit: a previous-token head in layer 0 whose
output the induction head in layer 1 reads through its keys (K-composition). By default the MLPs are
frozen at zero (`attn_only`), the position embeddings start from a sinusoidal basis (so relative
offsets are easy to learn) and a group-lasso penalty on the heads' output matrices (`head_l1`) keeps
few heads active.

`train_toy_model(ToyTrainConfig(...), out)` trains, then finds the previous-token head (layer 0,
attention to position p-1) and the induction head (layer 1, attention to the token after the
previous occurrence of the current token); where several heads do the same job, it records the one
whose zero-ablation raises the induction loss most. It writes the checkpoint
(`models.save_converted`) and `toy_metadata.json` (settings, final loss/accuracy, per-head scores,
the two head indices) to `out`, then `DONE`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxinterp import models
from jaxinterp.groundtruth import toy
from jaxinterp.runtime import files, inputs


@dataclasses.dataclass(frozen=True)
class ToyTrainConfig:
  """The toy model's architecture and training. Fields named as the binary's flags."""

  overwrite_bundled: bool = False  # allow `out` to be the bundled model's directory
  steps: int = 2000  # optimizer steps
  seed: int = 0  # seed of the initialisation and the data
  seq_len: int = 20  # longest repeated block n; rows are 1 + 2*seq_len tokens
  min_seq_len: int = 4  # shortest repeated block n
  eval_block_len: int = toy.DEFAULT_BLOCK_LEN  # recorded as `toy.induction_dataset`'s default
  batch_size: int = 32  # rows per step
  lr: float = 3e-3  # peak learning rate (linear warmup, cosine decay)
  weight_decay: float = 0.01  # AdamW weight decay
  n_tokens: int = toy.N_TOKENS  # content tokens; BOS is id n_tokens
  n_layers: int = 2
  n_heads: int = 4
  d_model: int = 64
  d_head: int = 64  # head width; 0 means d_model // n_heads
  d_mlp: int = 128
  n_ctx: int = 64  # context length (learned positions)
  attn_only: bool = True  # freeze the MLPs at exactly zero
  pos_init: str = "sinusoidal"  # or "normal": initialisation of the position embeddings
  head_l1: float = 0.01  # group-lasso weight on each head's ||W_O[h]||_F
  log_every: int = 100  # steps between progress-bar loss updates


# The settings recorded in toy_metadata.json's "flags", in this order.
RECORDED = ("steps", "seed", "seq_len", "min_seq_len", "eval_block_len", "batch_size", "lr",
            "weight_decay", "n_tokens", "n_layers", "n_heads", "d_model", "d_head", "d_mlp",
            "n_ctx", "attn_only", "pos_init", "head_l1")
OUTPUTS = (models.pretrained.CONVERTED_CONFIG, models.pretrained.CONVERTED_PARAMS,
           toy.METADATA_FILE)


class TrainError(inputs.InputError):
  """Settings that cannot train a model."""


def make_config(c: ToyTrainConfig) -> models.ModelConfig:
  """The architecture `c` gives; TrainError if `c` cannot train a model."""
  if c.d_head < 0 or (not c.d_head and c.d_model % c.n_heads):
    raise TrainError(f"--d_model={c.d_model} is not a multiple of --n_heads={c.n_heads}; "
                     f"set --d_head")
  if 1 + 2 * c.seq_len > c.n_ctx:
    raise TrainError(f"rows of 1 + 2*--seq_len = {1 + 2 * c.seq_len} tokens exceed "
                     f"--n_ctx={c.n_ctx}")
  if not 2 <= c.min_seq_len <= c.seq_len:
    raise TrainError(f"need 2 <= --min_seq_len ({c.min_seq_len}) <= --seq_len ({c.seq_len})")
  if 2 * c.seq_len > c.n_tokens:
    raise TrainError(f"--n_tokens={c.n_tokens} is too few for distinct blocks of "
                     f"--seq_len={c.seq_len}")
  if c.steps < 1:
    raise TrainError(f"--steps must be positive, got {c.steps}")
  if c.head_l1 < 0 or c.lr <= 0 or c.batch_size < 1:
    raise TrainError(f"need --head_l1 >= 0, --lr > 0 and --batch_size >= 1, got {c.head_l1}, "
                     f"{c.lr}, {c.batch_size}")
  return models.ModelConfig(
      family="gpt2", d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
      d_head=c.d_head or c.d_model // c.n_heads, d_mlp=c.d_mlp, d_vocab=c.n_tokens + 1,
      n_ctx=c.n_ctx, positional="learned", act_fn="gelu_new", tied_embeddings=True,
      bos_token_id=c.n_tokens, eos_token_id=c.n_tokens)


def _is_mlp(path) -> bool:
  return any(getattr(k, "key", None) == "mlp" for k in path)


def sinusoidal(n_ctx: int, d_model: int) -> np.ndarray:
  """Float[ndarray, "n_ctx d_model"] sinusoidal position code, rows of norm 0.02*sqrt(d_model)."""
  pos = np.arange(n_ctx)[:, None]
  freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2) / d_model))
  pe = np.zeros((n_ctx, d_model), np.float32)
  pe[:, 0::2], pe[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
  return pe * (0.02 * np.sqrt(d_model) / np.linalg.norm(pe, axis=1, keepdims=True))


def init(cfg: models.ModelConfig, key: jax.Array, attn_only: bool, pos_init: str = "sinusoidal"):
  """Random params; with `attn_only` every MLP weight and bias is zero (so the MLP outputs 0)."""
  params = models.init_params(cfg, key)
  if pos_init == "sinusoidal":
    params["W_pos"] = jnp.asarray(sinusoidal(cfg.n_ctx, cfg.d_model))
  elif pos_init != "normal":
    raise TrainError(f"unknown pos_init {pos_init!r}")
  if attn_only:
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _is_mlp(p) else x, params)
  return params


def make_optimizer(params, steps: int, lr: float, weight_decay: float, attn_only: bool):
  """AdamW with warmup + cosine decay and clipping; MLP params frozen when `attn_only`."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(200, steps // 10)), steps,
                                             lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  if not attn_only:
    return opt
  labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if _is_mlp(p) else "train",
                                            params)
  return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def head_penalty(cfg, params):
  """Group lasso over heads: the sum over all heads of the Frobenius norm of the head's W_O."""
  return sum(jnp.sqrt(jnp.sum(params[f"blocks_{li}"]["attn"]["W_O"] ** 2, (1, 2)) + 1e-12).sum()
             for li in range(cfg.n_layers))


def loss_fn(cfg, params, tokens, mask):
  """Mean next-token cross-entropy and accuracy over the masked (induction) targets."""
  logits = models.forward(cfg, params, tokens[:, :-1])
  targets = tokens[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  m = mask.astype(jnp.float32)
  denom = jnp.maximum(m.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == targets) * m).sum() / denom
  return (ce * m).sum() / denom, acc


def head_scores(cfg, params, block_len: int, n_tokens: int, seed: int) -> dict[str, np.ndarray]:
  """Per-head previous-token and induction scores on fresh `BOS r r` sequences.

  prev[l, h]: mean attention from position p to p-1 (p >= 1).
  induction[l, h]: mean attention from a second-half position p to p - n + 1, the token after the
  previous occurrence of the current token.
  """
  rng = np.random.default_rng(seed)
  tokens, _ = toy.repeated_batch(rng, 64, block_len, block_len, n_tokens, n_tokens,
                                random_layout=False)
  names = tuple(f"blocks.{li}.attn.hook_pattern" for li in range(cfg.n_layers))
  _, cache = models.forward(cfg, params, tokens, collect=names)
  P, n = tokens.shape[1], block_len
  prev = np.zeros((cfg.n_layers, cfg.n_heads))
  ind = np.zeros((cfg.n_layers, cfg.n_heads))
  q = np.arange(1, P)
  q2 = np.arange(n + 1, 2 * n + 1)
  for layer, name in enumerate(names):
    pat = np.asarray(cache[name])  # [batch, head, q, k]
    prev[layer] = pat[:, :, q, q - 1].mean((0, 2))
    ind[layer] = pat[:, :, q2, q2 - n + 1].mean((0, 2))
  return {"prev": prev, "induction": ind}


def ablation_effects(cfg, params, max_block: int, min_block: int, seed: int) -> np.ndarray:
  """Float[ndarray, "layer head"]: the increase of the induction loss when one head's output is
  zeroed."""
  rng = np.random.default_rng(seed)
  n_tokens = cfg.d_vocab - 1
  tokens, mask = toy.repeated_batch(rng, 128, max_block, min_block, n_tokens, n_tokens)

  @jax.jit
  def loss_without(params, layer_onehot, head_onehot):
    def zero(z, li):  # z: [batch, pos, head, d_head]
      return z * (1.0 - layer_onehot[li] * head_onehot)[None, None, :, None]
    ivs = {f"blocks.{li}.attn.hook_z": functools.partial(zero, li=li) for li in range(cfg.n_layers)}
    logits = models.forward(cfg, params, tokens[:, :-1], interventions=ivs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (ce * mask).sum() / mask.sum()

  base = float(loss_without(params, jnp.zeros(cfg.n_layers), jnp.zeros(cfg.n_heads)))
  out = np.zeros((cfg.n_layers, cfg.n_heads))
  for li in range(cfg.n_layers):
    for h in range(cfg.n_heads):
      out[li, h] = float(loss_without(params, jax.nn.one_hot(li, cfg.n_layers),
                                     jax.nn.one_hot(h, cfg.n_heads))) - base
  return out


def pick_head(scores: np.ndarray, effects: np.ndarray) -> int:
  """Among the heads scoring at least half the best pattern score, the one whose ablation hurts
  most."""
  ok = scores >= 0.5 * scores.max()
  return int(np.argmax(np.where(ok, effects, -np.inf)))


def train(cfg, steps: int, seed: int, batch_size: int, max_block: int, min_block: int, lr: float,
          weight_decay: float, attn_only: bool, log_every: int = 100,
          pos_init: str = "sinusoidal", head_l1: float = 0.0):
  """Train from scratch; returns (params, history of (step, loss, accuracy))."""
  params = init(cfg, jax.random.PRNGKey(seed), attn_only, pos_init)
  opt = make_optimizer(params, steps, lr, weight_decay, attn_only)
  state = opt.init(params)
  n_tokens = cfg.d_vocab - 1

  @jax.jit
  def step(params, state, tokens, mask):
    def objective(p):
      loss, acc = loss_fn(cfg, p, tokens, mask)
      return loss + head_l1 * head_penalty(cfg, p), (loss, acc)

    (_, (loss, acc)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, acc

  rng = np.random.default_rng(seed)
  history = []
  bar = tqdm(range(1, steps + 1), desc="train", mininterval=1.0)
  for i in bar:
    tokens, mask = toy.repeated_batch(rng, batch_size, max_block, min_block, n_tokens, n_tokens)
    params, state, loss, acc = step(params, state, tokens, mask)
    if i % log_every == 0 or i == steps:
      loss, acc = float(loss), float(acc)
      history.append((i, loss, acc))
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
  return params, history


def evaluate(cfg, params, max_block: int, min_block: int, seed: int, n_batches: int = 4):
  """Loss and accuracy on fresh held-out rows (a different data seed)."""
  rng = np.random.default_rng(seed + 10_000)
  f = jax.jit(lambda p, t, m: loss_fn(cfg, p, t, m))
  out = [f(params, *toy.repeated_batch(rng, 128, max_block, min_block, cfg.d_vocab - 1,
                                        cfg.d_vocab - 1)) for _ in range(n_batches)]
  return float(np.mean([o[0] for o in out])), float(np.mean([o[1] for o in out]))


def run_record(c: ToyTrainConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config, whole."""
  return files.RunRecord("train_toy_model", dataclasses.asdict(c), ("steps", "seed"))


def train_toy_model(c: ToyTrainConfig, out: str, *, overwrite: bool = False) -> dict:
  """Train, find the two heads and write the model and `toy_metadata.json` (with the config,
  whole) under `out` (see the module docstring); prints a summary and returns the metadata. Bad
  settings raise `TrainError`, a bad `out` an `inputs.InputError`; an `out` holding other outputs
  is refused unless `overwrite`, and this run, finished, is left as it is."""
  cfg = make_config(c)
  if os.path.realpath(out) == os.path.realpath(toy.TOY_MODEL_DIR) and not c.overwrite_bundled:
    raise inputs.InputError(f"--out={out} is the bundled model's directory; choose another "
                            f"(e.g. runs/toy_model), or pass --overwrite_bundled to replace it")
  record = run_record(c)
  # --overwrite_bundled says to replace the bundled model, whatever its directory holds.
  with inputs.run_dir(out, record=record, overwrite=overwrite or c.overwrite_bundled) as out_dir:
    if out_dir.complete:
      inputs.already_complete(out, record)
      return toy.toy_metadata(out)
    logging.info("config: %s", cfg)
    t0 = time.time()
    params, history = train(cfg, c.steps, c.seed, c.batch_size, c.seq_len, c.min_seq_len, c.lr,
                            c.weight_decay, c.attn_only, c.log_every, c.pos_init, c.head_l1)
    train_s = time.time() - t0
    loss, acc = evaluate(cfg, params, c.seq_len, c.min_seq_len, c.seed)
    scores = head_scores(cfg, params, c.seq_len, c.n_tokens, c.seed + 20_000)
    effects = ablation_effects(cfg, params, c.seq_len, c.min_seq_len, c.seed + 30_000)
    ind_layer = cfg.n_layers - 1
    prev_head = [0, pick_head(scores["prev"][0], effects[0])]
    ind_head = [ind_layer, pick_head(scores["induction"][ind_layer], effects[ind_layer])]
    meta = {
        "description": "attention-only induction model trained by experiments/train_toy_model.py "
                       "on rows of distinct random tokens in which a block r_1..r_n repeats "
                       "(random prefix and gap); head scores are measured on BOS r_1..r_n "
                       "r_1..r_n rows",
        "flags": {name: getattr(c, name) for name in RECORDED},
        "config": dataclasses.asdict(c),
        "n_tokens": c.n_tokens,
        "bos_id": c.n_tokens,
        "block_len": c.eval_block_len,
        "final_train_loss": history[-1][1],
        "final_train_accuracy": history[-1][2],
        "final_loss": loss,
        "final_accuracy": acc,
        "train_seconds": round(train_s, 1),
        "prev_token_head": prev_head,
        "induction_head": ind_head,
        "prev_token_scores": np.round(scores["prev"], 4).tolist(),
        "induction_scores": np.round(scores["induction"], 4).tolist(),
        "ablation_loss_increase": np.round(effects, 4).tolist(),
        "history": [[s, round(x, 4), round(a, 4)] for s, x, a in history],
    }
    with out_dir.writing(OUTPUTS):
      models.save_converted(models.Model(cfg, jax.tree.map(np.asarray, params), None, None), out)
      files.atomic_write_json(os.path.join(out, toy.METADATA_FILE), meta)
  print(f"trained {c.steps} steps in {train_s:.1f}s: held-out loss {loss:.4f}, accuracy "
        f"{acc:.4f}")
  print(f"previous-token head L{prev_head[0]}H{prev_head[1]} "
        f"(score {scores['prev'][0, prev_head[1]]:.3f}), induction head "
        f"L{ind_head[0]}H{ind_head[1]} (score {scores['induction'][ind_layer, ind_head[1]]:.3f})")
  print(f"wrote {out}")
  return meta
