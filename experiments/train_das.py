r"""Causal abstraction with DAS on a toy model whose intermediate variable is known.

Task: the input is `a b =` (a, b in 0..p-1, `=` is token p) and the model predicts S = (a + b) mod p
at `=`. The high-level causal model is `S := (a + b) mod p; O := S`. Interchanging S between a base
and a source input gives the counterfactual label S(source).

Ground truth by construction: the model has 2 layers and the attention of layer 1 is cut (its output
weights are held at zero while training), so the only path from the operands to the answer is layer
0's attention into position 2. Hence everything the answer depends on sits in the residual stream at
`=` after layer 0 (`blocks.1.hook_resid_pre`, position 2): DAS for S must succeed there and at the
final residual at `=`, and fail (IIA near chance 1/p) at positions 0 and 1 (no path to the answer
after layer 0; before it they hold a single operand) and at the embeddings.

The script (1) trains the tiny model with optax on all p^2 inputs (or loads it from --model_dir if
it is already there), shipping it via `models.save_converted`; (2) trains a DAS rotation
(`RotatedSpace`, QR parametrisation, k rotated dims) at each residual-stream layer x position,
evaluates IIA on held-out pairs and writes a heatmap PNG plus JSON/CSV; (3) runs the subspace-illusion
diagnostic for a 1-d direction learned at the layer-0 MLP neurons.

  python -m experiments.train_das                   # ~1 min on CPU
  python -m experiments.train_das --retrain_model   # retrain and overwrite the shipped model
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp import models
from jaxinterp.runtime import files
from jaxinterp.interventions import illusion
from jaxinterp.experiments import cli, common
from jaxinterp.interventions import Where
from jaxinterp.interventions.causal_model import CausalModel
from jaxinterp.interventions.saving import save_interventions
from jaxinterp.interventions.training import (init_low_rank, init_rotated_space, iia,
                                              train_interventions)

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxinterp",
                         "assets", "das_toy")
METADATA_FILE = "das_toy_metadata.json"

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", ASSET_DIR, "Where the toy model lives (trained there if absent).")
flags.DEFINE_bool("retrain_model", False, "Retrain the toy model even if --model_dir has one.")
flags.DEFINE_string("out", "runs/das", "Output directory for IIA results and trained interventions.")
flags.DEFINE_string("png", None, "Heatmap PNG path (default: --out/das_iia.png).")
flags.DEFINE_integer("p", 11, "Modulus of the toy task.")
flags.DEFINE_integer("model_steps", 1000, "Optimiser steps for the toy model.")
flags.DEFINE_float("model_lr", 1e-2, "Learning rate (AdamW) for the toy model.")
flags.DEFINE_integer("k", 8, "Interchanged rotated dimensions for DAS.")
flags.DEFINE_integer("das_steps", 250, "DAS optimiser steps per site.")
flags.DEFINE_integer("n_train", 4096, "Training pairs for DAS.")
flags.DEFINE_integer("n_eval", 1024, "Held-out pairs for IIA.")
flags.DEFINE_integer("seed", 0, "Random seed.")


# ---------------------------------------------------------------------------------------------------
# The toy task


def toy_config(p: int) -> models.ModelConfig:
  """2-layer GPT-2-style model over tokens 0..p-1 (numbers) and p ('=')."""
  return models.ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=128,
                            d_vocab=p + 1, n_ctx=3, act_fn="relu")


def encode(x: dict, p: int) -> list[int]:
  return [x["a"], x["b"], p]


def causal_model(p: int) -> CausalModel:
  """S := (a + b) mod p; O := S."""
  return CausalModel(["a", "b"], {"S": (lambda a, b: (a + b) % p, ["a", "b"]),
                                  "O": (lambda s: s, ["S"])}, output="O")


def all_inputs(p: int) -> np.ndarray:
  a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
  return np.stack([a.ravel(), b.ravel(), np.full(p * p, p)], 1).astype(np.int32)


def interchange_data(p: int, n: int, variables=("S",), seed: int = 0) -> dict:
  """(base, source, counterfactual label) triples for interchanging `variables`."""
  cm = causal_model(p)
  sample = lambda rng: {"a": int(rng.integers(p)), "b": int(rng.integers(p))}
  return cm.interchange_dataset(sample, n, variables, lambda x: encode(x, p), seed=seed)


def _cut_late_attention(cfg, params):
  """Zero the attention output of every layer after the first (kept at zero during training)."""
  params = dict(params)
  for l in range(1, cfg.n_layers):
    blk = dict(params[f"blocks_{l}"])
    attn = dict(blk["attn"])
    attn["W_O"] = jnp.zeros_like(attn["W_O"])
    if "b_O" in attn:
      attn["b_O"] = jnp.zeros_like(attn["b_O"])
    blk["attn"] = attn
    params[f"blocks_{l}"] = blk
  return params


def train_toy_model(p: int, steps: int, seed: int = 0, lr: float = 1e-2):
  """Train the toy model on all p^2 inputs; returns (cfg, params, accuracy).

  Attention after layer 0 is cut (its output weights are held at zero), so the only route from the
  operands to the answer is layer 0's attention into position 2: the sum must be assembled in the
  residual stream at `=` by the end of layer 0. That is the ground truth DAS should recover.
  """
  cfg = toy_config(p)
  params = _cut_late_attention(cfg, models.init_params(cfg, jax.random.PRNGKey(seed)))
  toks = jnp.asarray(all_inputs(p))
  labels = (toks[:, 0] + toks[:, 1]) % p
  opt = optax.adamw(lr, weight_decay=0.1)
  state = opt.init(params)

  def loss_fn(params):
    lg = models.forward(cfg, params, toks)[:, -1]
    return optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(loss_fn)(params)
    up, state = opt.update(g, state, params)
    return optax.apply_updates(params, up), state, loss

  for i in range(steps):
    params, state, loss = step(params, state)
    params = _cut_late_attention(cfg, params)
  acc = float((jnp.argmax(models.forward(cfg, params, toks)[:, -1], -1) == labels).mean())
  logging.info("toy model: loss %.4f acc %.3f", float(loss), acc)
  return cfg, params, acc


def load_das_toy(path: str = ASSET_DIR):
  """The shipped toy model (`models.Model`) and its metadata (p, accuracy, training flags)."""
  m = models.from_pretrained(path)
  with open(os.path.join(path, METADATA_FILE)) as f:
    meta = json.load(f)
  return m, meta


def das_sites(cfg) -> list[str]:
  """Residual-stream sites from the embeddings to the final residual."""
  return [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)] + \
      [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]


def das_at(cfg, params, site: str, position: int, train: dict, *, k: int, steps: int, seed: int = 0):
  """Train a DAS rotation (first k rotated dims) at one site and position; returns the template."""
  key = jax.random.PRNGKey(seed)
  tmpl = {site: init_rotated_space(key, cfg.d_model, k, where=Where.of(positions=position))}
  trained, _ = train_interventions(cfg, params, tmpl, train, steps=steps, batch_size=128,
                                   learning_rate=1e-2, seed=seed)
  return trained


# ---------------------------------------------------------------------------------------------------


def heatmap(grid: np.ndarray, sites: list[str], positions: list[str], chance: float, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(positions)), positions)
  ax.set_yticks(range(len(sites)), sites)
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
              color="black" if grid[i, j] > 0.5 else "white", fontsize=9)
  ax.set_xlabel("position")
  ax.set_title(f"DAS IIA for S = (a+b) mod p (chance {chance:.2f})", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046).set_label("interchange-intervention accuracy", fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
  plt.close(fig)


def _check_flags() -> None:
  """Usage errors naming the flag, before anything is trained."""
  common.positive("p", FLAGS.p, 2)
  for name in ("model_steps", "das_steps", "n_train", "n_eval"):
    common.positive(name, FLAGS[name].value)
  d_model = toy_config(FLAGS.p).d_model
  if not 1 <= FLAGS.k <= d_model:
    raise app.UsageError(f"--k={FLAGS.k}: must be between 1 and the model width {d_model}")
  if FLAGS.model_lr <= 0:
    raise app.UsageError(f"--model_lr={FLAGS.model_lr}: must be positive")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _check_flags()
  with common.run_dir(FLAGS.out) as out_dir:
    _run(out_dir)


def _run(out_dir):
  t0 = time.time()
  common.enable_compilation_cache()
  p = FLAGS.p
  md = FLAGS.model_dir
  if FLAGS.retrain_model or not os.path.exists(os.path.join(md, models.pretrained.CONVERTED_CONFIG)):
    cfg, params, acc = train_toy_model(p, FLAGS.model_steps, FLAGS.seed, FLAGS.model_lr)
    models.save_converted(models.Model(cfg, params), md)
    files.atomic_write_json(os.path.join(md, METADATA_FILE), {
        "task": "(a + b) mod p at '='", "p": p, "accuracy": acc, "tokens": "a b =", "eq_token": p,
        "model_steps": FLAGS.model_steps, "model_lr": FLAGS.model_lr, "seed": FLAGS.seed,
        "layer1_attention": "cut (W_O held at zero)", "known_site": ["blocks.1.hook_resid_pre", 2]})
  model, meta = load_das_toy(md)
  cfg, params = model.cfg, model.params
  if meta["p"] != p:
    raise app.UsageError(f"--p={p} but the model in {md} was trained with p={meta['p']}")
  print(f"toy model accuracy {meta['accuracy']:.3f} ({time.time() - t0:.1f}s)", flush=True)

  train = interchange_data(p, FLAGS.n_train, seed=FLAGS.seed + 1)
  held = interchange_data(p, FLAGS.n_eval, seed=FLAGS.seed + 2)
  sites = das_sites(cfg)
  positions = [0, 1, 2]
  grid = np.zeros((len(sites), len(positions)))
  rows = []
  png = FLAGS.png or os.path.join(FLAGS.out, "das_iia.png")
  outputs = ["iia.json", "iia.csv"] + [f"das_{s}_pos{q}" for s in sites for q in positions]
  if not FLAGS.png:
    outputs.append("das_iia.png")
  with out_dir.writing(outputs):  # DONE, listing them, last
    for i, site in enumerate(sites):
      for j, pos in enumerate(positions):
        trained = das_at(cfg, params, site, pos, train, k=FLAGS.k, steps=FLAGS.das_steps,
                         seed=FLAGS.seed)
        grid[i, j] = iia(cfg, params, trained, held)
        rows.append({"site": site, "position": pos, "k": FLAGS.k, "iia": grid[i, j]})
        print(f"{site} pos {pos}: IIA {grid[i, j]:.3f} ({time.time() - t0:.1f}s)", flush=True)
        save_interventions(os.path.join(FLAGS.out, f"das_{site}_pos{pos}"), trained,
                           metadata={"iia": grid[i, j], "variable": "S", "p": p})
    chance = 1.0 / p
    labels = ["a", "b", "="]
    heatmap(grid, sites, [f"{q} ({lab})" for q, lab in zip(positions, labels)], chance, png)
    files.atomic_write_csv(os.path.join(FLAGS.out, "iia.csv"), rows)

    # Subspace-illusion diagnostic: a 1-d direction among the layer-0 MLP neurons at '='.
    site = "blocks.0.mlp.hook_post"
    key = jax.random.PRNGKey(FLAGS.seed)
    tmpl = {site: init_low_rank(key, cfg.d_mlp, 1, where=Where.of(positions=2))}
    trained, _ = train_interventions(cfg, params, tmpl, train, steps=FLAGS.das_steps, batch_size=128,
                                     learning_rate=1e-2, seed=FLAGS.seed)
    v = trained[site].matrix()[:, 0]
    lab_cf, lab_base = jnp.asarray(held["label"]), (held["base"][:, 0] + held["base"][:, 1]) % p
    rows_ = jnp.arange(lab_cf.shape[0])
    metric = lambda lg: lg[rows_, -1, lab_cf] - lg[rows_, -1, lab_base]
    rep = illusion.illusion_report(cfg, params, site, v, held["base"], held["source"], metric,
                                   where=Where.of(positions=2))
    rep["iia_1d"] = iia(cfg, params, trained, held)
    print(f"illusion diagnostic at {site}: {rep}", flush=True)

    result = {"p": p, "chance": chance, "k": FLAGS.k, "sites": sites, "positions": positions,
              "iia": grid.tolist(), "model_accuracy": meta["accuracy"],
              "illusion": {"site": site, "position": 2, **rep}, "seconds": time.time() - t0}
    files.atomic_write_json(os.path.join(FLAGS.out, "iia.json"), result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
