r"""Train the bundled toy model: a 2-layer GPT-2-style transformer that forms induction heads.

The model is trained with optax on rows `BOS u.. r_1..r_n w.. r_1..r_n v..` of distinct random
tokens in which a block `r` of random length n <= --seq_len repeats after a random prefix `u` and a
random gap `w` (filler `v` completes the row), with the next-token cross-entropy on the second copy
only. Because the position of the repeat and the distance between the copies vary, no positional
shortcut works and the model learns the textbook circuit: a previous-token head in layer 0 whose
output the induction head in layer 1 reads through its keys (K-composition). By default the MLPs are
frozen at zero (`--attn_only`), the position embeddings start from a sinusoidal basis (so relative
offsets are easy to learn) and a group-lasso penalty on the heads' output matrices (`--head_l1`)
keeps few heads active.

After training, the script finds the previous-token head (layer 0, attention to position p-1) and
the induction head (layer 1, attention to the token after the previous occurrence of the current
token); where several heads do the same job, it records the one whose zero-ablation raises the
induction loss most. It writes the checkpoint (`models.save_converted`) and `toy_metadata.json`
(flags, final loss/accuracy, per-head scores, the two head indices) to --out, then `DONE`:

  python -m experiments.train_toy_model --out=runs/toy_model
  python -m experiments.find_circuit --model=runs/toy_model   # then use it like the bundled one

The bundled model (`jaxinterp/assets/toy/`) is only overwritten with `--overwrite_bundled`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxinterp import models
from jaxinterp.runtime import files
from jaxinterp.groundtruth import toy
from jaxinterp.experiments import cli, common

FLAGS = flags.FLAGS

flags.DEFINE_string("out", "runs/toy_model", "Output directory for the checkpoint and metadata "
                    "(not the bundled model's directory, unless --overwrite_bundled).")
flags.DEFINE_bool("overwrite_bundled", False, "Allow --out to be the bundled model's directory "
                  "(jaxinterp/assets/toy), replacing the model the README's numbers come from.")
flags.DEFINE_integer("steps", 2000, "Optimizer steps.")
flags.DEFINE_integer("seed", 0, "Seed for the initialisation and the data.")
flags.DEFINE_integer("seq_len", 20, "Longest repeated block n; rows are 1 + 2*seq_len tokens.")
flags.DEFINE_integer("min_seq_len", 4, "Shortest repeated block n.")
flags.DEFINE_integer("eval_block_len", toy.DEFAULT_BLOCK_LEN,
                     "Block length recorded as the default of `jaxinterp.groundtruth.toy.induction_dataset`.")
flags.DEFINE_integer("batch_size", 32, "Rows per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (linear warmup, cosine decay).")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
flags.DEFINE_integer("n_tokens", toy.N_TOKENS, "Number of content tokens; BOS is id n_tokens.")
flags.DEFINE_integer("n_layers", 2, "Layers.")
flags.DEFINE_integer("n_heads", 4, "Heads per layer.")
flags.DEFINE_integer("d_model", 64, "Residual width.")
flags.DEFINE_integer("d_head", 64, "Head width; wide heads can copy the whole vocabulary alone, which "
                     "keeps the circuit from spreading over many heads. 0 means d_model // n_heads.")
flags.DEFINE_integer("d_mlp", 128, "MLP width.")
flags.DEFINE_integer("n_ctx", 64, "Context length (learned positions).")
flags.DEFINE_bool("attn_only", True, "Freeze the MLPs at exactly zero (an attention-only model).")
flags.DEFINE_enum("pos_init", "sinusoidal", ["sinusoidal", "normal"],
                  "Initialisation of the (learned) position embeddings: a sinusoidal basis scaled to "
                  "the token embeddings' norm (relative offsets such as 'previous token' are then "
                  "easy to learn), or normal(0.02).")
flags.DEFINE_float("head_l1", 0.01,
                   "Group-lasso weight on each head's output matrix norm ||W_O[h]||_F, which "
                   "favours a sparse circuit (few heads with large outputs).")
flags.DEFINE_integer("log_every", 100, "Steps between progress-bar loss updates.")


class TrainError(ValueError):
  """Flags that cannot train a model."""


def make_config() -> models.ModelConfig:
  """The architecture given by the flags."""
  if FLAGS.d_head < 0 or (not FLAGS.d_head and FLAGS.d_model % FLAGS.n_heads):
    raise TrainError(f"--d_model={FLAGS.d_model} is not a multiple of --n_heads={FLAGS.n_heads}; "
                     f"set --d_head")
  if 1 + 2 * FLAGS.seq_len > FLAGS.n_ctx:
    raise TrainError(f"rows of 1 + 2*--seq_len = {1 + 2 * FLAGS.seq_len} tokens exceed "
                     f"--n_ctx={FLAGS.n_ctx}")
  if not 2 <= FLAGS.min_seq_len <= FLAGS.seq_len:
    raise TrainError(f"need 2 <= --min_seq_len ({FLAGS.min_seq_len}) <= --seq_len ({FLAGS.seq_len})")
  if 2 * FLAGS.seq_len > FLAGS.n_tokens:
    raise TrainError(f"--n_tokens={FLAGS.n_tokens} is too few for distinct blocks of "
                     f"--seq_len={FLAGS.seq_len}")
  if FLAGS.steps < 1:
    raise TrainError(f"--steps must be positive, got {FLAGS.steps}")
  if FLAGS.head_l1 < 0 or FLAGS.lr <= 0 or FLAGS.batch_size < 1:
    raise TrainError(f"need --head_l1 >= 0, --lr > 0 and --batch_size >= 1, got {FLAGS.head_l1}, "
                     f"{FLAGS.lr}, {FLAGS.batch_size}")
  return models.ModelConfig(
      family="gpt2", d_model=FLAGS.d_model, n_layers=FLAGS.n_layers, n_heads=FLAGS.n_heads,
      d_head=FLAGS.d_head or FLAGS.d_model // FLAGS.n_heads, d_mlp=FLAGS.d_mlp,
      d_vocab=FLAGS.n_tokens + 1,
      n_ctx=FLAGS.n_ctx, positional="learned", act_fn="gelu_new", tied_embeddings=True,
      bos_token_id=FLAGS.n_tokens, eos_token_id=FLAGS.n_tokens)


def _is_mlp(path) -> bool:
  return any(getattr(k, "key", None) == "mlp" for k in path)


def sinusoidal(n_ctx: int, d_model: int) -> np.ndarray:
  """Float[ndarray, "n_ctx d_model"] sinusoidal position code with rows of norm 0.02*sqrt(d_model)."""
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
  labels = jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if _is_mlp(p) else "train", params)
  return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def head_penalty(cfg, params):
  """Group lasso over heads: the sum over all heads of the Frobenius norm of the head's W_O."""
  return sum(jnp.sqrt(jnp.sum(params[f"blocks_{l}"]["attn"]["W_O"] ** 2, (1, 2)) + 1e-12).sum()
             for l in range(cfg.n_layers))


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
  names = tuple(f"blocks.{l}.attn.hook_pattern" for l in range(cfg.n_layers))
  _, cache = models.forward(cfg, params, tokens, collect=names)
  P, n = tokens.shape[1], block_len
  prev = np.zeros((cfg.n_layers, cfg.n_heads))
  ind = np.zeros((cfg.n_layers, cfg.n_heads))
  q = np.arange(1, P)
  q2 = np.arange(n + 1, 2 * n + 1)
  for l, name in enumerate(names):
    pat = np.asarray(cache[name])  # [batch, head, q, k]
    prev[l] = pat[:, :, q, q - 1].mean((0, 2))
    ind[l] = pat[:, :, q2, q2 - n + 1].mean((0, 2))
  return {"prev": prev, "induction": ind}


def ablation_effects(cfg, params, max_block: int, min_block: int, seed: int) -> np.ndarray:
  """Float[ndarray, "layer head"]: increase of the induction loss when one head's output is zeroed."""
  rng = np.random.default_rng(seed)
  n_tokens = cfg.d_vocab - 1
  tokens, mask = toy.repeated_batch(rng, 128, max_block, min_block, n_tokens, n_tokens)

  @jax.jit
  def loss_without(params, layer_onehot, head_onehot):
    def zero(z, l):  # z: [batch, pos, head, d_head]
      return z * (1.0 - layer_onehot[l] * head_onehot)[None, None, :, None]
    ivs = {f"blocks.{l}.attn.hook_z": (lambda z, l=l: zero(z, l)) for l in range(cfg.n_layers)}
    logits = models.forward(cfg, params, tokens[:, :-1], interventions=ivs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (ce * mask).sum() / mask.sum()

  base = float(loss_without(params, jnp.zeros(cfg.n_layers), jnp.zeros(cfg.n_heads)))
  out = np.zeros((cfg.n_layers, cfg.n_heads))
  for l in range(cfg.n_layers):
    for h in range(cfg.n_heads):
      out[l, h] = float(loss_without(params, jax.nn.one_hot(l, cfg.n_layers),
                                     jax.nn.one_hot(h, cfg.n_heads))) - base
  return out


def pick_head(scores: np.ndarray, effects: np.ndarray) -> int:
  """Among the heads scoring at least half the best pattern score, the one whose ablation hurts most."""
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


OUTPUTS = (models.pretrained.CONVERTED_CONFIG, models.pretrained.CONVERTED_PARAMS, toy.METADATA_FILE)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = make_config()
  except TrainError as e:
    raise app.UsageError(str(e)) from None
  if (os.path.realpath(FLAGS.out) == os.path.realpath(toy.TOY_MODEL_DIR)
      and not FLAGS.overwrite_bundled):
    raise app.UsageError(f"--out={FLAGS.out} is the bundled model's directory; choose another "
                         f"(e.g. runs/toy_model), or pass --overwrite_bundled to replace it")
  with common.run_dir(FLAGS.out) as out_dir:
    _train_and_save(cfg, out_dir)


def _train_and_save(cfg, out_dir) -> None:
  common.enable_compilation_cache()
  logging.info("config: %s", cfg)
  t0 = time.time()
  params, history = train(cfg, FLAGS.steps, FLAGS.seed, FLAGS.batch_size, FLAGS.seq_len,
                          FLAGS.min_seq_len, FLAGS.lr, FLAGS.weight_decay, FLAGS.attn_only,
                          FLAGS.log_every, FLAGS.pos_init, FLAGS.head_l1)
  train_s = time.time() - t0
  loss, acc = evaluate(cfg, params, FLAGS.seq_len, FLAGS.min_seq_len, FLAGS.seed)
  scores = head_scores(cfg, params, FLAGS.seq_len, FLAGS.n_tokens, FLAGS.seed + 20_000)
  effects = ablation_effects(cfg, params, FLAGS.seq_len, FLAGS.min_seq_len, FLAGS.seed + 30_000)
  ind_layer = cfg.n_layers - 1
  prev_head = [0, pick_head(scores["prev"][0], effects[0])]
  ind_head = [ind_layer, pick_head(scores["induction"][ind_layer], effects[ind_layer])]

  meta = {
      "description": "attention-only induction model trained by experiments/train_toy_model.py on "
                     "rows of distinct random tokens in which a block r_1..r_n repeats (random "
                     "prefix and gap); head scores are measured on BOS r_1..r_n r_1..r_n rows",
      "flags": {name: FLAGS[name].value for name in (
          "steps", "seed", "seq_len", "min_seq_len", "eval_block_len", "batch_size", "lr",
          "weight_decay", "n_tokens", "n_layers", "n_heads", "d_model", "d_head", "d_mlp", "n_ctx",
          "attn_only", "pos_init", "head_l1")},
      "n_tokens": FLAGS.n_tokens,
      "bos_id": FLAGS.n_tokens,
      "block_len": FLAGS.eval_block_len,
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
      "history": [[s, round(l, 4), round(a, 4)] for s, l, a in history],
  }
  with out_dir.writing(OUTPUTS):
    models.save_converted(models.Model(cfg, jax.tree.map(np.asarray, params), None, None),
                          FLAGS.out)
    files.atomic_write_json(os.path.join(FLAGS.out, toy.METADATA_FILE), meta)
  print(f"trained {FLAGS.steps} steps in {train_s:.1f}s: held-out loss {loss:.4f}, accuracy "
        f"{acc:.4f}")
  print(f"previous-token head L{prev_head[0]}H{prev_head[1]} "
        f"(score {scores['prev'][0, prev_head[1]]:.3f}), induction head L{ind_head[0]}H{ind_head[1]} "
        f"(score {scores['induction'][ind_layer, ind_head[1]]:.3f})")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
