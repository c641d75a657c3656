r"""A tiny GPT-2-vocabulary model trained by the project to do indirect object identification (IOI).

No pretrained GPT-2 weights ship here, so this module trains a model that does IOI, for running
`find_circuit --task=ioi --level=position --schema=ioi` end to end on a model with a real IOI
circuit (docs/tasks.md). The model is a 2-layer, 4-head, d_model-64 GPT-2-family transformer with
the full 50257-token vocabulary (tied embeddings, learned positions, BOS = `<|endoftext|>`) whose
MLPs are frozen at zero, as the bundled toy model's (`toy_training.init`, `make_optimizer`).

Data: EAP-IG's IOI CSV (`clean`, `corrupted`, `correct_idx`, `incorrect_idx`). Each row's clean
prompt with its IO name (the answer, `correct_idx`) and subject S (`incorrect_idx`, named twice)
replaced by placeholders is a template (`csv_templates`); the names of every row (IO, S and the
corrupted prompt's third name C) are the name set. `ioi_prompts` fills templates with random
distinct names into rows of the CSV's own format (the corrupted prompt replaces S2 by a third
name, as EAP-IG's), leaving out every clean prompt of the CSV: the CSV rows are held out for
evaluation. Training reads the last position only, over the tokens the prompts use (the other
embedding rows keep their initialisation): by default the cross-entropy of the IO name plus the
logistic loss of logit[IO] - logit[S] (`OBJECTIVES`). With the cross-entropy alone every head
learns to attend to the first clause's two names (IO and S1) and to avoid S2, and training sits at
a 50/50 guess between the two names (measured: held-out accuracy 0.48-0.52 after 1000-1500
steps, with 4 or 8 heads, 2 or 3 layers); the pairwise term penalises copying S from the first
step and the model leaves that plateau after ~500 steps.

`train_ioi_model(IOITrainConfig(...), out)` trains, evaluates the logit difference
logit[IO] - logit[S] on the held-out CSV rows (clean and corrupted, accuracy = share of clean rows
with a positive difference) and writes the checkpoint (`models.save_converted`, with the GPT-2
`tokenizer.json`, so `--model=out` reads it), `ioi_metadata.json` and `run.json` to `out`, then
`DONE`. Seeded and deterministic.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxinterp import models, tasks
from jaxinterp.groundtruth import toy_training
from jaxinterp.runtime import files, inputs
from jaxinterp.tasks.tokenization import as_tokenizer, single_token_words

METADATA_FILE = "ioi_metadata.json"
OUTPUTS = (models.pretrained.CONVERTED_CONFIG, models.pretrained.CONVERTED_PARAMS,
           "tokenizer.json", METADATA_FILE)
GPT2_EOS = 50256  # <|endoftext|>: GPT-2's BOS, EOS and the pad token of its prompts
COLUMNS = ("clean", "corrupted", "correct_idx", "incorrect_idx")
OBJECTIVES = {
    "ce": "cross-entropy of the IO name over every token the prompts use",
    "pair": "logistic loss of the logit difference, softplus(-(logit[IO] - logit[S]))",
    "ce+pair": "the sum of the two",
}


class IOIDataError(inputs.InputError):
  """An IOI CSV (or its rows) this module cannot turn into templates and names."""


@dataclasses.dataclass(frozen=True)
class IOITrainConfig:
  """The IOI model's architecture, data and training."""

  data: str  # EAP-IG's IOI CSV (its rows are held out; templates and names come from them)
  tokenizer: str  # GPT-2's tokenizer.json, or a directory holding one
  steps: int = 1000  # optimizer steps
  seed: int = 0  # seed of the initialisation and the generated prompts
  n_train: int = 20_000  # generated training rows (cycled through in seeded random order)
  batch_size: int = 64  # rows per step
  lr: float = 3e-3  # peak learning rate (linear warmup, cosine decay)
  weight_decay: float = 0.01  # AdamW weight decay
  n_layers: int = 2
  n_heads: int = 4
  d_model: int = 64
  d_head: int = 16
  n_ctx: int = 64  # context length (learned positions)
  attn_only: bool = True  # freeze the MLPs at exactly zero
  pos_init: str = "sinusoidal"  # or "normal": initialisation of the position embeddings
  objective: str = "ce+pair"  # "ce", "pair" or "ce+pair" (see `OBJECTIVES`)
  log_every: int = 100  # steps between progress-bar loss updates


# ------------------------------------------------------------------------------------------- data


def read_rows(path: str) -> list[dict[str, str]]:
  """The CSV's rows (dicts of its columns); IOIDataError naming the file for a missing column."""
  if not os.path.isfile(path):
    raise IOIDataError(f"--data={path}: no such file")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise IOIDataError(f"--data={path}: missing column(s) {', '.join(missing)}")
    rows = list(reader)
  if not rows:
    raise IOIDataError(f"--data={path}: no rows")
  return rows


def _word(name: str) -> re.Pattern:
  return re.compile(r"(?<![A-Za-z])" + re.escape(name) + r"(?![A-Za-z])")


def csv_templates(rows, tokenizer) -> tuple[list[str], list[str]]:
  """The CSV's templates and names: (sorted distinct templates, sorted names).

  A template is a row's clean prompt with its IO name (`correct_idx`, once) as `{A}` and its
  subject (`incorrect_idx`, twice) as `{B}`; the names are every row's IO, S and the corrupted
  prompt's replacement of S2 (C), without the leading space. IOIDataError names a row (1-based,
  after the header) that does not have this shape.
  """
  tok = as_tokenizer(tokenizer)
  templates, names = set(), set()
  for i, r in enumerate(rows, start=2):
    try:
      io, s = (tok.decode([int(r[k])]).strip() for k in ("correct_idx", "incorrect_idx"))
    except ValueError:
      raise IOIDataError(f"row {i}: correct_idx/incorrect_idx are not token ids") from None
    clean, corrupted = r["clean"], r["corrupted"]
    if len(_word(io).findall(clean)) != 1 or len(_word(s).findall(clean)) != 2:
      raise IOIDataError(f"row {i}: the clean prompt does not name IO {io!r} once and S {s!r} "
                         f"twice")
    head, _, tail = clean.rpartition(" " + s)
    if not (corrupted.startswith(head + " ") and corrupted.endswith(tail)):
      raise IOIDataError(f"row {i}: the corrupted prompt does not replace S2 {s!r} alone")
    c = corrupted[len(head) + 1:len(corrupted) - len(tail)]
    if not c or c in (io, s) or not c.isalpha():
      raise IOIDataError(f"row {i}: the corrupted prompt's third name {c!r} is not a new name")
    templates.add(_word(s).sub("{B}", _word(io).sub("{A}", clean)))
    names.update((io, s, c))
  return sorted(templates), sorted(names)


def ioi_prompts(templates, names, tokenizer, n: int, seed: int = 0,
                exclude=()) -> list[dict[str, object]]:
  """`n` IOI rows in the CSV's format from `templates` and `names`, deterministic in `seed`.

  Each row fills a random template with distinct random names A (IO) and B (S), and replaces S2 by
  a third name C in `corrupted`; `correct_idx`/`incorrect_idx` are the ids of " A" and " B". Only
  names that are one token with a leading space are used, and clean prompts in `exclude` (the
  held-out rows) or already drawn are skipped.
  """
  tok = as_tokenizer(tokenizer)
  ids = single_token_words(tok, names)
  pool = sorted(ids)
  if len(pool) < 3 or not templates:
    raise IOIDataError(f"need >= 3 single-token names and a template, got {len(pool)} names and "
                       f"{len(templates)} templates")
  rng = np.random.default_rng(seed)
  seen, rows = set(exclude), []
  tries = 0
  while len(rows) < n:
    tries += 1
    if tries > 50 * n + 1000:
      raise IOIDataError(f"could only generate {len(rows)} of {n} new prompts")
    t = templates[rng.integers(len(templates))]
    a, b, c = (pool[i] for i in rng.choice(len(pool), 3, replace=False))
    clean = t.format(A=a, B=b)
    if clean in seen:
      continue
    seen.add(clean)
    head, _, tail = clean.rpartition(" " + b)
    rows.append({"clean": clean, "corrupted": f"{head} {c}{tail}", "correct_idx": ids[a],
                 "incorrect_idx": ids[b]})
  return rows


def _dataset(rows, tokenizer, source: str) -> tasks.Dataset:
  return tasks.from_rows("ioi", rows, tokenizer, bos_id=GPT2_EOS, vocab_size=50257, source=source)


# ------------------------------------------------------------------------------------------ model


def make_config(c: IOITrainConfig) -> models.ModelConfig:
  """The GPT-2-family architecture `c` gives (full GPT-2 vocabulary, BOS = <|endoftext|>)."""
  if c.steps < 2 or c.batch_size < 1 or c.n_train < c.batch_size or c.lr <= 0:
    raise toy_training.TrainError(f"need --steps >= 2, --lr > 0 and --n_train >= --batch_size "
                                  f">= 1, got {c.steps}, {c.lr}, {c.n_train}, {c.batch_size}")
  if c.objective not in OBJECTIVES:
    raise toy_training.TrainError(f"--objective={c.objective}: choose from {', '.join(OBJECTIVES)}")
  return models.ModelConfig(
      family="gpt2", d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, d_head=c.d_head,
      d_mlp=4 * c.d_model, d_vocab=50257, n_ctx=c.n_ctx, positional="learned",
      act_fn="gelu_new", tied_embeddings=True, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS)


def last_logits(cfg, params, tokens, last):
  """Float[Array, "batch vocab"]: the logits at each row's last real position only."""
  _, cache = models.forward(cfg, params, tokens, collect=("ln_final.hook_normalized",))
  return models.transformer.last_token_logits(cfg, params, cache["ln_final.hook_normalized"],
                                              last)[:, 0]


def train(cfg, data: tasks.Dataset, c: IOITrainConfig, vocab: np.ndarray):
  """Train from scratch on `data`'s clean prompts; returns (params, [(step, loss, accuracy)]),
  the accuracy being the share of the batch with logit[IO] > logit[S].

  The loss (`c.objective`, see `OBJECTIVES`) is read at the last position, over the tokens
  `vocab` (every token the prompts use, sorted): only their embedding rows are trained (the others
  would get no gradient but weight decay), as a compact table, which makes a step far cheaper than
  over the 50257 rows; the rows of the other tokens keep their initialisation.
  """
  full = toy_training.init(cfg, jax.random.PRNGKey(c.seed), c.attn_only, c.pos_init)
  small_cfg = dataclasses.replace(cfg, d_vocab=len(vocab), bos_token_id=None, eos_token_id=None)
  params = dict(full, W_E=full["W_E"][vocab])
  opt = toy_training.make_optimizer(params, c.steps, c.lr, c.weight_decay, c.attn_only)
  state = opt.init(params)
  index = np.full(cfg.d_vocab, -1, np.int32)
  index[vocab] = np.arange(len(vocab))
  tokens_all, targets = index[data.clean], index[data.labels["correct"]]  # compact ids
  wrong = index[data.labels["incorrect"]]
  w_ce, w_pair = float("ce" in c.objective.split("+")), float("pair" in c.objective.split("+"))
  if (tokens_all < 0).any() or (targets < 0).any():
    raise ValueError("`vocab` misses tokens of the training prompts")

  @jax.jit
  def step(params, state, tokens, last, target, wrong):
    def loss_fn(p):
      logits = last_logits(small_cfg, p, tokens, last)  # [batch, len(vocab)]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
      rows = jnp.arange(logits.shape[0])
      diff = logits[rows, target] - logits[rows, wrong]
      return w_ce * ce + w_pair * jax.nn.softplus(-diff).mean(), (diff > 0).mean()

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, acc

  rng = np.random.default_rng(c.seed + 1)
  n = len(data.lengths)
  order = rng.permutation(n)
  history, at = [], 0
  bar = tqdm(range(1, c.steps + 1), desc="train IOI", mininterval=1.0)
  for i in bar:
    if at + c.batch_size > n:
      order, at = rng.permutation(n), 0
    idx = np.sort(order[at:at + c.batch_size])
    at += c.batch_size
    # One compiled shape: every batch keeps the dataset's full (right-padded) width.
    params, state, loss, acc = step(params, state, tokens_all[idx], data.lengths[idx] - 1,
                                    targets[idx], wrong[idx])
    if i % c.log_every == 0 or i == c.steps:
      loss, acc = float(loss), float(acc)
      history.append((i, loss, acc))
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
  params = dict(params, W_E=full["W_E"].at[vocab].set(params["W_E"]))
  return params, history


def logit_diffs(cfg, params, data: tasks.Dataset, corrupted: bool = False) -> np.ndarray:
  """Float[ndarray, "n"]: logit[IO] - logit[S] at each row's last token (clean or corrupted)."""
  f = jax.jit(lambda p, t, last: last_logits(cfg, p, t, last))
  toks = data.corrupted if corrupted else data.clean
  out = []
  for s in range(0, len(data.lengths), 250):
    sl = slice(s, s + 250)
    lg = np.asarray(f(params, toks[sl], data.lengths[sl] - 1))
    rows = np.arange(lg.shape[0])
    out.append(lg[rows, data.labels["correct"][sl]] - lg[rows, data.labels["incorrect"][sl]])
  return np.concatenate(out)


def evaluate(cfg, params, data: tasks.Dataset) -> dict[str, float]:
  """Held-out IOI numbers: the mean clean and corrupted logit differences and the accuracy (the
  share of rows whose clean difference is positive)."""
  clean, corrupted = logit_diffs(cfg, params, data), logit_diffs(cfg, params, data, True)
  return {"n": int(clean.size), "mean_logit_diff": float(clean.mean()),
          "accuracy": float((clean > 0).mean()),
          "mean_corrupted_logit_diff": float(corrupted.mean())}


def run_record(c: IOITrainConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config, whole."""
  return files.RunRecord("train_ioi_model", dataclasses.asdict(c), ("steps", "seed"))


def train_ioi_model(c: IOITrainConfig, out: str, *, overwrite: bool = False) -> dict:
  """Generate prompts, train, evaluate on the held-out CSV rows and write the model under `out`
  (see the module docstring); prints a summary and returns the metadata (an `out` holding this
  finished run is left as it is and its metadata returned)."""
  cfg = make_config(c)
  tok_path = c.tokenizer if os.path.isfile(c.tokenizer) else os.path.join(c.tokenizer,
                                                                          "tokenizer.json")
  tokenizer = models.pretrained.load_tokenizer(tok_path)
  if tokenizer is None:
    raise IOIDataError(f"--tokenizer={c.tokenizer}: no tokenizer.json there")
  if tokenizer.get_vocab_size() != cfg.d_vocab:
    raise IOIDataError(f"--tokenizer={c.tokenizer}: {tokenizer.get_vocab_size()} tokens, not "
                       f"GPT-2's {cfg.d_vocab}")
  rows = read_rows(c.data)
  templates, names = csv_templates(rows, tokenizer)
  record = run_record(c)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as out_dir:
    if out_dir.complete:
      inputs.already_complete(out, record)
      return ioi_metadata(out)
    held_out = _dataset(rows, tokenizer, c.data)
    train_rows = ioi_prompts(templates, names, tokenizer, c.n_train, c.seed,
                             exclude={r["clean"] for r in rows})
    train_data = _dataset(train_rows, tokenizer, f"ioi_prompts(seed={c.seed})")
    logging.info("config: %s", cfg)
    t0 = time.time()
    vocab = np.unique(np.concatenate([np.ravel(d.clean) for d in (train_data, held_out)]
                                     + [np.ravel(d.corrupted) for d in (train_data, held_out)]))
    params, history = train(cfg, train_data, c, vocab)
    train_s = time.time() - t0
    result = evaluate(cfg, params, held_out)
    meta = {
        "description": "attention-only GPT-2-vocabulary IOI model (jaxinterp.groundtruth.ioi_model)"
                       " trained on prompts from the CSV's templates and names; the CSV rows are "
                       "held out",
        "config": dataclasses.asdict(c),
        "n_templates": len(templates), "n_names": len(names),
        "train_seconds": round(train_s, 1),
        "held_out": result,
        "history": [[s, round(x, 4), round(a, 4)] for s, x, a in history],
    }
    with out_dir.writing(OUTPUTS):
      models.save_converted(models.Model(cfg, jax.tree.map(np.asarray, params)), out)
      shutil.copyfile(tok_path, os.path.join(out, "tokenizer.json"))  # `--model=out` reads it
      files.atomic_write_json(os.path.join(out, METADATA_FILE), meta)
  print(f"trained {c.steps} steps in {train_s:.1f}s on {c.n_train} prompts ({len(templates)} "
        f"templates, {len(names)} names); held-out {result['n']} CSV rows: accuracy "
        f"{result['accuracy']:.3f}, mean logit diff {result['mean_logit_diff']:.3f} (corrupted "
        f"{result['mean_corrupted_logit_diff']:.3f})")
  print(f"wrote {out}")
  return meta


def ioi_metadata(path: str) -> dict:
  """The training record next to a checkpoint written by `train_ioi_model`."""
  p = os.path.join(path, METADATA_FILE)
  if not os.path.exists(p):
    raise FileNotFoundError(f"{p} not found; train a model with "
                            f"jaxinterp.groundtruth.ioi_model.train_ioi_model")
  with open(p) as f:
    return json.load(f)
