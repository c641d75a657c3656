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

The model ships in `jaxinterp/assets/das_toy` (`load_das_toy`). `train_das(DASConfig(...), out)`
(`experiments/train_das.py`'s pipeline) (1) trains the model with optax on all p^2 inputs if
`model_dir` has none (or `retrain_model`), saving it with `models.save_converted`; (2) trains a DAS
rotation (`RotatedSpace`, QR parametrisation, k rotated dims) at each residual-stream layer x
position, evaluates IIA on held-out pairs and writes a heatmap PNG plus JSON/CSV; (3) runs the
subspace-illusion diagnostic for a 1-d direction learned at the layer-0 MLP neurons. In a
multi-process run (`runtime.distributed`) process p trains the items p, p + N, ... of (2) and (3)
and every process gets all their results, bitwise one process's (`distributed.map_split`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp import models
from jaxinterp.interventions import illusion
from jaxinterp.interventions.basic import Where
from jaxinterp.interventions.causal_model import CausalModel
from jaxinterp.interventions.saving import save_interventions
from jaxinterp.interventions.training import (
  iia,
  init_low_rank,
  init_rotated_space,
  train_interventions,
)
from jaxinterp.runtime import distributed, files, inputs
from jaxinterp.viz import plots

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "das_toy")
METADATA_FILE = "das_toy_metadata.json"


def toy_config(p: int) -> models.ModelConfig:
  """2-layer GPT-2-style model over tokens 0..p-1 (numbers) and p ('=')."""
  return models.ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=128,
                            d_vocab=p + 1, n_ctx=3, act_fn="relu")


def encode(x: dict, p: int) -> list[int]:
  """The tokens `a b =` of the input {"a": a, "b": b}."""
  return [x["a"], x["b"], p]


def causal_model(p: int) -> CausalModel:
  """S := (a + b) mod p; O := S."""
  return CausalModel(["a", "b"], {"S": (lambda a, b: (a + b) % p, ["a", "b"]),
                                  "O": (lambda s: s, ["S"])}, output="O")


def all_inputs(p: int) -> np.ndarray:
  """Int[ndarray, "p*p 3"]: every input `a b =`."""
  a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
  return np.stack([a.ravel(), b.ravel(), np.full(p * p, p)], 1).astype(np.int32)


def interchange_data(p: int, n: int, variables=("S",), seed: int = 0) -> dict:
  """(base, source, counterfactual label) triples for interchanging `variables`."""
  def sample(rng):
    return {"a": int(rng.integers(p)), "b": int(rng.integers(p))}
  return causal_model(p).interchange_dataset(sample, n, variables, lambda x: encode(x, p),
                                             seed=seed)


def _cut_late_attention(cfg, params):
  """Zero the attention output of every layer after the first (kept at zero during training)."""
  params = dict(params)
  for layer in range(1, cfg.n_layers):
    blk = dict(params[f"blocks_{layer}"])
    attn = dict(blk["attn"])
    attn["W_O"] = jnp.zeros_like(attn["W_O"])
    if "b_O" in attn:
      attn["b_O"] = jnp.zeros_like(attn["b_O"])
    blk["attn"] = attn
    params[f"blocks_{layer}"] = blk
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

  for _ in range(steps):
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
  return [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)] + \
      [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]


def das_template(cfg, site: str, position: int, *, k: int, seed: int = 0) -> dict:
  """The untrained DAS rotation (first k rotated dims) at one site and position that `das_at`
  trains: {site: RotatedSpace}."""
  key = jax.random.PRNGKey(seed)
  return {site: init_rotated_space(key, cfg.d_model, k, where=Where.of(positions=position))}


def das_at(cfg, params, site: str, position: int, train: dict, *, k: int, steps: int,
           seed: int = 0):
  """Train a DAS rotation (first k rotated dims) at one site and position; returns the template."""
  tmpl = das_template(cfg, site, position, k=k, seed=seed)
  trained, _ = train_interventions(cfg, params, tmpl, train, steps=steps, batch_size=128,
                                   learning_rate=1e-2, seed=seed)
  return trained


# ----------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class DASConfig:
  """What `train_das` trains. Fields named as the binary's flags."""

  model_dir: str = ASSET_DIR  # where the toy model lives (trained there if absent)
  retrain_model: bool = False  # retrain the toy model even if model_dir has one
  png: str | None = None  # heatmap PNG path (default: out/das_iia.png)
  p: int = 11  # modulus of the toy task
  model_steps: int = 1000  # optimiser steps for the toy model
  model_lr: float = 1e-2  # learning rate (AdamW) for the toy model
  k: int = 8  # interchanged rotated dimensions for DAS
  das_steps: int = 250  # DAS optimiser steps per site
  n_train: int = 4096  # training pairs for DAS
  n_eval: int = 1024  # held-out pairs for IIA
  seed: int = 0


def _check(config: DASConfig) -> None:
  """InputErrors naming the flag, before anything is trained."""
  inputs.positive("p", config.p, 2)
  for name in ("model_steps", "das_steps", "n_train", "n_eval"):
    inputs.positive(name, getattr(config, name))
  d_model = toy_config(config.p).d_model
  if not 1 <= config.k <= d_model:
    raise inputs.InputError(f"--k={config.k}: must be between 1 and the model width {d_model}")
  if config.model_lr <= 0:
    raise inputs.InputError(f"--model_lr={config.model_lr}: must be positive")


def _model(config: DASConfig, t0: float):
  """The toy model of `config.model_dir`, trained and saved there first if needed (by process 0 of
  a multi-process run, which decides; the others wait for it, then load it too)."""
  md, p = config.model_dir, config.p
  several = distributed.process_count() > 1
  fit = config.retrain_model or not os.path.exists(os.path.join(md,
                                                                models.pretrained.CONVERTED_CONFIG))
  if several:
    fit = distributed.broadcast_bytes(b"1" if fit else b"0") == b"1"
  if fit and files.is_writer():
    cfg, params, acc = train_toy_model(p, config.model_steps, config.seed, config.model_lr)
    _save_model(models.Model(cfg, params), md, several)
    files.atomic_write_json(os.path.join(md, METADATA_FILE), {
        "task": "(a + b) mod p at '='", "p": p, "accuracy": acc, "tokens": "a b =", "eq_token": p,
        "model_steps": config.model_steps, "model_lr": config.model_lr, "seed": config.seed,
        "layer1_attention": "cut (W_O held at zero)", "known_site": ["blocks.1.hook_resid_pre", 2]})
  if fit and several:
    distributed.allgather_bytes(b"")  # the others wait here until process 0 has saved the model
  model, meta = load_das_toy(md)
  if meta["p"] != p:
    raise inputs.InputError(f"--p={p} but the model in {md} was trained with p={meta['p']}")
  print(f"toy model accuracy {meta['accuracy']:.3f} ({time.time() - t0:.1f}s)", flush=True)
  return model, meta


def _save_model(model: models.Model, md: str, several: bool) -> None:
  """`models.save_converted`; in a multi-process run (process 0 alone) the same files through
  `files.save_arrays`, whose orbax does not wait for the other processes at barriers."""
  if not several:
    models.save_converted(model, md)
    return
  os.makedirs(md, exist_ok=True)
  files.save_arrays(os.path.join(md, models.pretrained.CONVERTED_PARAMS),
                    jax.tree.map(np.asarray, model.params))
  files.atomic_write_text(os.path.join(md, models.pretrained.CONVERTED_CONFIG),
                          json.dumps(model.cfg.to_dict(), indent=1))


def _illusion(cfg, params, config: DASConfig, train: dict, held: dict) -> dict:
  """Subspace-illusion diagnostic: a 1-d direction among the layer-0 MLP neurons at '='."""
  site, p = "blocks.0.mlp.hook_post", config.p
  key = jax.random.PRNGKey(config.seed)
  tmpl = {site: init_low_rank(key, cfg.d_mlp, 1, where=Where.of(positions=2))}
  trained, _ = train_interventions(cfg, params, tmpl, train, steps=config.das_steps,
                                   batch_size=128, learning_rate=1e-2, seed=config.seed)
  v = trained[site].matrix()[:, 0]
  lab_cf, lab_base = jnp.asarray(held["label"]), (held["base"][:, 0] + held["base"][:, 1]) % p
  rows = jnp.arange(lab_cf.shape[0])

  def metric(lg):
    return lg[rows, -1, lab_cf] - lg[rows, -1, lab_base]

  rep = illusion.illusion_report(cfg, params, site, v, held["base"], held["source"], metric,
                                 where=Where.of(positions=2))
  rep["iia_1d"] = iia(cfg, params, trained, held)
  return {"site": site, "position": 2, **rep}


def _grid(cfg, params, config: DASConfig, train: dict, held: dict, out: str, t0: float):
  """DAS at every residual-stream site x position, then the illusion diagnostic: (IIA grid
  [site, position], CSV rows, illusion record). The trained rotations are saved under `out`. In a
  multi-process run process p trains items p, p + N, ... and every process gets all the results
  (`distributed.map_split`), bitwise one process's; process 0 saves and prints them."""
  sites, positions = das_sites(cfg), [0, 1, 2]
  items = [(site, pos) for site in sites for pos in positions]
  grid = np.zeros((len(sites), len(positions)))
  rows = []

  def one(_, item) -> dict[str, np.ndarray]:
    if item is None:
      text = json.dumps(_illusion(cfg, params, config, train, held))
      return {"json": np.frombuffer(text.encode(), np.uint8)}
    trained = das_at(cfg, params, *item, train, k=config.k, steps=config.das_steps,
                     seed=config.seed)
    leaves = jax.tree.leaves(trained)
    return {"iia": np.asarray(iia(cfg, params, trained, held), np.float64),
            **{f"leaf{n}": np.asarray(x) for n, x in enumerate(leaves)}}

  def done(n: int, result: dict[str, np.ndarray]) -> None:
    if n == len(items):
      rep = json.loads(result["json"].tobytes().decode())
      shown = {k: v for k, v in rep.items() if k not in ("site", "position")}
      print(f"illusion diagnostic at {rep['site']}: {shown}", flush=True)
      return
    (i, j), (site, pos) = divmod(n, len(positions)), items[n]
    grid[i, j] = result["iia"]
    rows.append({"site": site, "position": pos, "k": config.k, "iia": grid[i, j]})
    print(f"{site} pos {pos}: IIA {grid[i, j]:.3f} ({time.time() - t0:.1f}s)", flush=True)
    tree = jax.tree.structure(das_template(cfg, site, pos, k=config.k, seed=config.seed))
    trained = jax.tree.unflatten(tree, [result[f"leaf{m}"] for m in range(tree.num_leaves)])
    save_interventions(os.path.join(out, f"das_{site}_pos{pos}"), trained,
                       metadata={"iia": grid[i, j], "variable": "S", "p": config.p})

  results = distributed.map_split([*items, None], one, done)
  return grid, rows, json.loads(results[-1]["json"].tobytes().decode())


def run_record(config: DASConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config, whole."""
  return files.RunRecord("train_das", dataclasses.asdict(config), ("p", "k", "seed"))


def train_das(config: DASConfig, out: str, *, overwrite: bool = False) -> dict:
  """Run the experiment (see the module docstring) and write under `out`: `iia.json` (with the
  config, whole), `iia.csv`, the trained interventions `das_{site}_pos{position}` and the heatmap
  (`das_iia.png` unless `config.png`), then `DONE`. Prints progress and returns `iia.json`'s
  contents. Bad input raises `inputs.InputError`; an `out` holding other outputs is refused unless
  `overwrite`, and this run, finished, is left as it is."""
  _check(config)
  record = run_record(config)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as out_dir:
    if out_dir.complete:
      inputs.already_complete(out, record)
      with open(os.path.join(out, "iia.json")) as f:
        return json.load(f)
    t0 = time.time()
    model, meta = _model(config, t0)
    cfg, params, p = model.cfg, model.params, config.p
    train = interchange_data(p, config.n_train, seed=config.seed + 1)
    held = interchange_data(p, config.n_eval, seed=config.seed + 2)
    sites, positions = das_sites(cfg), [0, 1, 2]
    png = config.png or os.path.join(out, "das_iia.png")
    outputs = ["iia.json", "iia.csv"] + [f"das_{s}_pos{q}" for s in sites for q in positions]
    if not config.png:
      outputs.append("das_iia.png")
    with out_dir.writing(outputs):  # DONE, listing them, last
      grid, rows, illusion_record = _grid(cfg, params, config, train, held, out, t0)
      chance = 1.0 / p
      if files.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
      plots.plot_heatmap(grid, png, xlabel="position", ylabel="site",
                         title=f"DAS IIA for S = (a+b) mod p (chance {chance:.2f})",
                         xticklabels=[f"{q} ({lab})" for q, lab in zip(positions, "ab=",
                                                                        strict=True)],
                         yticklabels=sites, colorbar_label="interchange-intervention accuracy")
      files.atomic_write_csv(os.path.join(out, "iia.csv"), rows)
      result = {"p": p, "chance": chance, "k": config.k, "sites": sites, "positions": positions,
                "iia": grid.tolist(), "model_accuracy": meta["accuracy"],
                "illusion": illusion_record,
                "seconds": time.time() - t0, "config": dataclasses.asdict(config)}
      files.atomic_write_json(os.path.join(out, "iia.json"), result)
  print(json.dumps(result, indent=1))
  return result
