"""The bundled model with MLPs (`jaxinterp/assets/toy_mlp/`) and its transcoders
(`jaxinterp/assets/toy_transcoders/`): the default of `experiments/attribution_graph.py`, so that a
newcomer's attribution graph runs offline in seconds.

The bundled toy (`assets/toy/`) is attention-only, so transcoders on it have no live features. A
model trained on its induction rows alone, with MLPs, does induction in attention and leaves its
MLPs little to do (their features then carry ~3% of a graph's influence, and pruning drops them
all). So toy_mlp learns two tasks, mixed in every batch:

- induction: `groundtruth.toy.repeated_batch`'s rows (3/4 of each batch), loss on the second copy;
- successor chains: rows `BOS s f(s) f(f(s)) ...` (1/4), loss on every token after the first, where
  `f` is a fixed random cyclic permutation of the 128 content tokens (`successor_permutation`).
  With tied embeddings and 128 tokens in 64 dimensions, no linear map sends every embedding to its
  successor's: the lookup is a job for the MLPs, whose transcoder features then carry most of a
  chain prompt's influence (and some of an induction prompt's, where they help overrule it).

Then one ReLU transcoder per layer is trained on the model's own activations on both kinds of rows
(`training.train_transcoders`, reading `mlp.hook_in`, writing `hook_mlp_out`) and saved in
circuit-tracer's format (`saving.save_transcoder_set`). `train_bundled(out_model, out_transcoders,
seed=0)` does both, deterministically from the seed:

    python -c "from jaxinterp.transcoders import toy; toy.train_bundled(toy.TOY_MLP_DIR, \\
        toy.TOY_TRANSCODERS_DIR)"
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxinterp import models
from jaxinterp.groundtruth import toy as toy_data
from jaxinterp.groundtruth import toy_training
from jaxinterp.runtime import files
from jaxinterp.transcoders import saving, training

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOY_MLP_DIR = os.path.join(ASSETS, "toy_mlp")
TOY_TRANSCODERS_DIR = os.path.join(ASSETS, "toy_transcoders")
TOY_MLP = "toy_mlp"  # the name `--model` takes for TOY_MLP_DIR
SCAN = "jaxinterp-toy-mlp-transcoders"
REPORT_FILE = "training.json"  # the transcoders' settings, FVE and L0, beside config.yaml

# The model: the bundled toy's sizes, with MLPs and 16-wide heads (~75k parameters), and no group
# lasso on the heads (with it, the MLP model forms no induction circuit in 3000 steps).
MODEL_CONFIG = toy_training.ToyTrainConfig(d_head=16, n_ctx=48, attn_only=False, head_l1=0.0,
                                           steps=3000)
CHAIN_SHARE = 4  # 1 row in CHAIN_SHARE of each batch is a successor chain
# The transcoders: 128 ReLU features per layer.
TRANSCODER_OPTIONS = training.TrainOptions(d_transcoder=128, activation="relu", sparsity=2e-2,
                                           steps=3000, batch_size=1024, learning_rate=3e-3,
                                           scan=SCAN)
N_TRAIN_ROWS = 512  # rows whose activations train the transcoders (half induction, half chains)
INDUCTION_BLOCK = 16  # the induction check's block length (prompts `BOS r_1..r_L r_1..r_{L-1}`)


def successor_permutation(n_tokens: int, seed: int) -> np.ndarray:
  """Int[ndarray, "n_tokens"]: `f`, a random permutation of `0..n_tokens-1` with one cycle (so a
  chain never repeats a token before n_tokens steps, and induction cannot predict it)."""
  order = np.random.default_rng(seed + 123).permutation(n_tokens)
  f = np.empty(n_tokens, np.int64)
  f[order] = np.roll(order, -1)
  return f


def chain_batch(rng: np.random.Generator, batch: int, n_pos: int, successor: np.ndarray,
                bos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows `BOS s f(s) f(f(s)) ...` of `n_pos` tokens from random starts `s`.

  Returns tokens: Int[ndarray, "batch n_pos"]; mask: Bool[ndarray, "batch n_pos-1"], the next-token
  targets (every one but the start, which follows BOS at random).
  """
  toks = np.empty((batch, n_pos), np.int64)
  toks[:, 0] = bos_id
  toks[:, 1] = rng.integers(0, len(successor), batch)
  for p in range(2, n_pos):
    toks[:, p] = successor[toks[:, p - 1]]
  mask = np.ones((batch, n_pos - 1), bool)
  mask[:, 0] = False
  return toks, mask


def _mixed_batch(rng, c: toy_training.ToyTrainConfig, batch: int, successor: np.ndarray):
  n_chain = batch // CHAIN_SHARE
  a, am = toy_data.repeated_batch(rng, batch - n_chain, c.seq_len, c.min_seq_len, c.n_tokens,
                                  c.n_tokens)
  b, bm = chain_batch(rng, n_chain, a.shape[1], successor, c.n_tokens)
  return np.concatenate([a, b]), np.concatenate([am, bm])


def induction_accuracy(model: models.Model, n: int = 512, seq_len: int = INDUCTION_BLOCK,
                       seed: int = 1) -> float:
  """Top-1 accuracy of `model` on `toy.induction_dataset`'s clean prompts: the share of prompts
  `BOS r_1..r_L r_1..r_{L-1}` whose last-position argmax is r_L."""
  n_tokens = model.cfg.d_vocab - 1
  d = toy_data.induction_dataset(n, seq_len, seed, n_tokens=n_tokens, bos_id=n_tokens)
  logits = models.forward(model.cfg, model.params, jnp.asarray(d["clean"]))  # [n, pos, vocab]
  return float(np.mean(np.asarray(jnp.argmax(logits[:, -1], -1)) == d["correct"]))


def successor_accuracy(model: models.Model, successor: np.ndarray, n: int = 256,
                       seed: int = 1) -> float:
  """Top-1 accuracy of `model` on fresh successor chains (every target after the start)."""
  rng = np.random.default_rng(seed + 60_000)
  toks, mask = chain_batch(rng, n, 1 + 2 * MODEL_CONFIG.seq_len, successor, model.cfg.d_vocab - 1)
  logits = models.forward(model.cfg, model.params, jnp.asarray(toks[:, :-1]))
  hit = np.asarray(jnp.argmax(logits, -1)) == toks[:, 1:]
  return float(hit[mask].mean())


def train_model(out: str, seed: int = 0) -> dict:
  """Train toy_mlp (`MODEL_CONFIG`, induction and successor rows mixed) into `out`: the checkpoint
  (`models.save_converted`) and `toy_metadata.json` (settings, final loss and accuracy, both
  tasks' accuracies, the successor permutation). Returns the metadata."""
  c = dataclasses.replace(MODEL_CONFIG, seed=seed)
  cfg = toy_training.make_config(c)
  successor = successor_permutation(c.n_tokens, seed)
  params = toy_training.init(cfg, jax.random.PRNGKey(seed), False, c.pos_init)
  opt = toy_training.make_optimizer(params, c.steps, c.lr, c.weight_decay, False)
  state = opt.init(params)

  @jax.jit
  def step(params, state, tokens, mask):
    (loss, acc), grads = jax.value_and_grad(
        lambda p: toy_training.loss_fn(cfg, p, tokens, mask), has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, acc

  rng = np.random.default_rng(seed)
  t0, history = time.time(), []
  bar = tqdm(range(1, c.steps + 1), desc="train toy_mlp", mininterval=1.0)
  for i in bar:
    params, state, loss, acc = step(params, state, *_mixed_batch(rng, c, c.batch_size, successor))
    if i % c.log_every == 0 or i == c.steps:
      history.append([i, round(float(loss), 4), round(float(acc), 4)])
      bar.set_postfix(loss=f"{history[-1][1]:.3f}", acc=f"{history[-1][2]:.3f}")
  model = models.Model(cfg, jax.tree.map(np.asarray, params), None, None)
  models.save_converted(model, out)
  meta = {"description": "the transcoders' bundled model: induction rows (the bundled toy's) and "
                         "successor chains BOS s f(s) f(f(s)) ... mixed, trained by "
                         "jaxinterp.transcoders.toy.train_bundled",
          "config": dataclasses.asdict(c), "chain_share": 1 / CHAIN_SHARE,
          "n_tokens": c.n_tokens, "bos_id": c.n_tokens, "train_seconds": round(time.time() - t0, 1),
          "final_train_loss": history[-1][1], "final_train_accuracy": history[-1][2],
          "induction_accuracy": induction_accuracy(model),
          "induction_block_len": INDUCTION_BLOCK,
          "successor_accuracy": successor_accuracy(model, successor),
          "successor": successor.tolist(), "history": history}
  files.atomic_write_json(os.path.join(out, toy_data.METADATA_FILE), meta)
  return meta


def successor(model_dir: str = TOY_MLP_DIR) -> np.ndarray:
  """The successor permutation `f` toy_mlp (at `model_dir`) was trained on."""
  return np.asarray(toy_data.toy_metadata(model_dir)["successor"], np.int64)


def training_tokens(model: models.Model, n_rows: int = N_TRAIN_ROWS, seed: int = 0,
                    successor_map: np.ndarray | None = None) -> np.ndarray:
  """Int[ndarray, "n_rows pos"]: rows of the model's own tasks, half induction rows
  (`toy.repeated_batch`), half successor chains (`successor_map`, default the permutation of
  `seed`)."""
  c = MODEL_CONFIG
  n_tokens = model.cfg.d_vocab - 1
  f = successor_permutation(n_tokens, seed) if successor_map is None else successor_map
  rng = np.random.default_rng(seed + 40_000)
  a = toy_data.repeated_batch(rng, n_rows - n_rows // 2, c.seq_len, c.min_seq_len, n_tokens,
                              n_tokens)[0]
  b = chain_batch(rng, n_rows // 2, a.shape[1], f, n_tokens)[0]
  return np.concatenate([a, b])


def train_bundled(out_model: str, out_transcoders: str, seed: int = 0) -> dict:
  """Train the toy_mlp model into `out_model` (`train_model`) and its transcoders into
  `out_transcoders`.

  The transcoders (`TRANSCODER_OPTIONS`) train on the model's activations on `N_TRAIN_ROWS` fresh
  rows (`training_tokens`); `out_transcoders` gets circuit-tracer's `config.yaml` and
  `layer_{i}.safetensors`, and `training.json` with the settings and each layer's fraction of
  variance explained and L0. Returns that report.
  """
  meta = train_model(out_model, seed)
  model = toy_data.load_toy(out_model)
  opts = dataclasses.replace(TRANSCODER_OPTIONS, seed=seed)
  result = training.train_transcoders(model.cfg, model.params,
                                      jnp.asarray(training_tokens(model, seed=seed)), opts)
  saving.save_transcoder_set(result.transcoders, out_transcoders, model_name=TOY_MLP)
  report = {"options": dataclasses.asdict(opts), "n_train_rows": N_TRAIN_ROWS, "seed": seed,
            "fraction_variance_explained": np.round(result.fraction_variance_explained,
                                                    4).tolist(),
            "l0": np.round(result.l0, 2).tolist(), "final_loss": float(result.losses[-1]),
            "model_induction_accuracy": meta["induction_accuracy"],
            "model_successor_accuracy": meta["successor_accuracy"]}
  with open(os.path.join(out_transcoders, REPORT_FILE), "w") as fh:
    json.dump(report, fh, indent=1)
  print(f"induction accuracy {meta['induction_accuracy']:.4f}, successor accuracy "
        f"{meta['successor_accuracy']:.4f}; transcoders: FVE "
        f"{report['fraction_variance_explained']}, L0 {report['l0']}")
  return report
