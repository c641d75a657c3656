"""The bundled model with MLPs (`jaxinterp/assets/toy_mlp/`) and its transcoders
(`jaxinterp/assets/toy_transcoders/`): the default of `experiments/attribution_graph.py`, so that a
newcomer's attribution graph runs offline in seconds.

The bundled toy (`assets/toy/`) is attention-only, so transcoders on it have no live features. The
toy_mlp model is trained on the same induction rows (`groundtruth.toy_training`, with its MLPs
trained, `attn_only=False`, and narrower heads), then one ReLU transcoder per layer is trained on
the model's own activations on those rows (`training.train_transcoders`, reading `mlp.hook_in`,
writing `hook_mlp_out`) and saved in circuit-tracer's format (`saving.save_transcoder_set`).
`train_bundled(out_model, out_transcoders, seed=0)` does both, deterministically from the seed:

    python -c "from jaxinterp.transcoders import toy; toy.train_bundled(toy.TOY_MLP_DIR, \\
        toy.TOY_TRANSCODERS_DIR)"
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

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

# The model: the bundled toy's task and sizes, with MLPs and 16-wide heads (~75k parameters), and
# no group lasso on the heads (with it, the MLP model forms no induction circuit in 3000 steps).
MODEL_CONFIG = toy_training.ToyTrainConfig(d_head=16, n_ctx=48, attn_only=False, head_l1=0.0,
                                           steps=3000)
# The transcoders: 128 ReLU features per layer.
TRANSCODER_OPTIONS = training.TrainOptions(d_transcoder=128, activation="relu", sparsity=2e-2,
                                           steps=3000, batch_size=1024, learning_rate=3e-3,
                                           scan=SCAN)
N_TRAIN_ROWS = 512  # rows of `toy.repeated_batch` whose activations train the transcoders
INDUCTION_BLOCK = 16  # the induction check's block length (prompts `BOS r_1..r_L r_1..r_{L-1}`)


def induction_accuracy(model: models.Model, n: int = 512, seq_len: int = INDUCTION_BLOCK,
                       seed: int = 1) -> float:
  """Top-1 accuracy of `model` on `toy.induction_dataset`'s clean prompts: the share of prompts
  `BOS r_1..r_L r_1..r_{L-1}` whose last-position argmax is r_L."""
  n_tokens = model.cfg.d_vocab - 1
  d = toy_data.induction_dataset(n, seq_len, seed, n_tokens=n_tokens, bos_id=n_tokens)
  logits = models.forward(model.cfg, model.params, jnp.asarray(d["clean"]))  # [n, pos, vocab]
  return float(np.mean(np.asarray(jnp.argmax(logits[:, -1], -1)) == d["correct"]))


def training_tokens(model: models.Model, n_rows: int = N_TRAIN_ROWS, seed: int = 0) -> np.ndarray:
  """Int[ndarray, "n_rows pos"]: the model's own training rows (`toy.repeated_batch`)."""
  c = MODEL_CONFIG
  n_tokens = model.cfg.d_vocab - 1
  rng = np.random.default_rng(seed + 40_000)
  return toy_data.repeated_batch(rng, n_rows, c.seq_len, c.min_seq_len, n_tokens, n_tokens)[0]


def train_bundled(out_model: str, out_transcoders: str, seed: int = 0) -> dict:
  """Train the toy_mlp model into `out_model` and its transcoders into `out_transcoders`.

  The model is `toy_training.train_toy_model(MODEL_CONFIG with seed)`; its `toy_metadata.json`
  gains `induction_accuracy` (`induction_accuracy`). The transcoders (`TRANSCODER_OPTIONS`) train on
  the model's activations on `N_TRAIN_ROWS` fresh training rows; `out_transcoders` gets
  circuit-tracer's `config.yaml` and `layer_{i}.safetensors`, and `training.json` with the settings
  and each layer's fraction of variance explained and L0. Returns that report.
  """
  config = dataclasses.replace(MODEL_CONFIG, seed=seed)
  meta = toy_training.train_toy_model(config, out_model, overwrite=True)
  model = toy_data.load_toy(out_model)
  acc = induction_accuracy(model)
  meta = {**meta, "description": "induction model with MLPs (the transcoders' bundled model), "
                                 "trained by jaxinterp.transcoders.toy.train_bundled on the "
                                 "bundled toy's rows", "induction_accuracy": acc,
          "induction_block_len": INDUCTION_BLOCK}
  files.atomic_write_json(os.path.join(out_model, toy_data.METADATA_FILE), meta)
  opts = dataclasses.replace(TRANSCODER_OPTIONS, seed=seed)
  result = training.train_transcoders(model.cfg, model.params,
                                      jnp.asarray(training_tokens(model, seed=seed)), opts)
  saving.save_transcoder_set(result.transcoders, out_transcoders, model_name=TOY_MLP)
  report = {"options": dataclasses.asdict(opts), "n_train_rows": N_TRAIN_ROWS, "seed": seed,
            "fraction_variance_explained": np.round(result.fraction_variance_explained,
                                                    4).tolist(),
            "l0": np.round(result.l0, 2).tolist(), "final_loss": float(result.losses[-1]),
            "model_induction_accuracy": acc}
  with open(os.path.join(out_transcoders, REPORT_FILE), "w") as fh:
    json.dump(report, fh, indent=1)
  print(f"induction accuracy {acc:.4f}; transcoders: FVE {report['fraction_variance_explained']}, "
        f"L0 {report['l0']}")
  return report

