"""The run behind `experiments/train_transcoders.py`: load a model, get token rows (sampled from
the model itself, or read from a token-id or text file: `corpus`), train one transcoder per layer
on the model's activations (`training.train_transcoders`), measure each layer's fraction of variance
explained and L0 on the training rows and on held-out rows, and write circuit-tracer's transcoder
set (`config.yaml`, `layer_{l}.safetensors`: `saving.save_transcoder_set`), `training.json` and
`DONE` to `out`.

Every check of the input runs before `out` is created, so bad input is one line and leaves no
directory. A finished run in `out` is kept: the same settings report it complete, other settings
(or another binary's outputs) are refused unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxinterp.models.pretrained import Model
from jaxinterp.runtime import files, inputs
from jaxinterp.transcoders import corpus, hooks, saving, toy, training
from jaxinterp.transcoders.errors import TranscoderError

BINARY = "train_transcoders"
REPORT_FILE = toy.REPORT_FILE  # training.json, as beside the bundled set
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_SEQ_LEN = 128  # sampled rows: min(this, the model's context)


@dataclasses.dataclass(frozen=True)
class TrainTranscodersConfig:
  """One transcoder-training run (each field is the binary's flag of the same name).

  Attributes:
    model: HF checkpoint directory, orbax conversion, or "toy_mlp" (the bundled model with MLPs).
    tokenizer: a tokenizer.json (or its directory) for `text`, when the model has none.
    text: a text file (each non-empty line a document, cut into rows of `seq_len` tokens); or
    token_ids: a file of token ids (`.npy` [rows, pos], or one row of ids per line); neither: the
      model samples `rows` rows of `seq_len` tokens after BOS at `temperature` (0: greedy), each
      ending at the model's EOS.
    heldout: the share of rows left out of training, on which FVE and L0 are measured too.
    activation: "relu" (L1 penalty) or "jumprelu" (L0 penalty, straight-through estimator).
    features: features per layer. sparsity: the penalty's coefficient. skip: a linear skip too.
    steps, lr, batch_size: Adam's steps, step size and tokens per step. seed: the sampling's, the
      split's and the training's seed. dtype: the model's while its activations are collected, and
      the saved transcoders' (training itself is float32).
  """

  model: str = toy.TOY_MLP
  tokenizer: str = ""
  text: str = ""
  token_ids: str = ""
  rows: int = 256
  seq_len: int = 0  # 0: min(DEFAULT_SEQ_LEN, the model's context)
  temperature: float = 1.0
  heldout: float = 0.1
  activation: str = "relu"
  features: int = 128
  sparsity: float = 1e-2
  skip: bool = False
  steps: int = 1000
  lr: float = 3e-3
  batch_size: int = 512
  seed: int = 0
  dtype: str = "float32"


def _check(c: TrainTranscodersConfig, out: str) -> None:
  if c.activation not in ("relu", "jumprelu"):
    raise TranscoderError(f"--activation must be relu or jumprelu, got {c.activation!r}")
  if c.dtype not in DTYPES:
    raise TranscoderError(f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
  for name in ("features", "steps", "batch_size", "rows"):
    inputs.positive(name, getattr(c, name))
  inputs.positive("seq_len", c.seq_len, minimum=0)
  if c.seq_len == 1:
    raise TranscoderError("--seq_len must be 0 (the default) or at least 2, got 1")
  if not c.lr > 0 or not c.sparsity >= 0:
    raise TranscoderError(f"--lr must be > 0 and --sparsity >= 0, got {c.lr} and {c.sparsity}")
  if not 0 <= c.heldout < 1:
    raise TranscoderError(f"--heldout must be in [0, 1), got {c.heldout}")
  if c.temperature < 0:
    raise TranscoderError(f"--temperature must be >= 0, got {c.temperature}")
  if c.text and c.token_ids:
    raise TranscoderError("give --text or --token_ids, not both")
  if c.tokenizer and not c.text:
    raise TranscoderError("--tokenizer is only read with --text")
  inputs.input_file("text", c.text)
  inputs.input_file("token_ids", c.token_ids)
  if os.path.realpath(out) == os.path.realpath(toy.TOY_TRANSCODERS_DIR):
    raise TranscoderError(f"--out={out} is the bundled transcoders' directory; choose another "
                          "(jaxinterp.transcoders.toy.train_bundled rebuilds the bundled set)")


def load_rows(c: TrainTranscodersConfig, model: Model) -> tuple[np.ndarray, np.ndarray, str]:
  """The run's token rows and mask ([rows, pos] each, BOS first, right padding) and where they
  came from, in words."""
  cfg, bos = model.cfg, inputs.bos_id(model)
  seq_len = c.seq_len or min(DEFAULT_SEQ_LEN, cfg.n_ctx)
  if c.token_ids:
    toks, mask = corpus.read_token_ids(c.token_ids, bos, cfg.d_vocab, cfg.n_ctx)
    return toks, mask, f"token ids from {c.token_ids}"
  if c.text:
    toks, mask = corpus.read_text(c.text, model.tokenizer, bos, min(seq_len, cfg.n_ctx),
                                  cfg.d_vocab)
    return toks, mask, f"text from {c.text}"
  bar = tqdm(total=seq_len - 1, desc="sample", unit="pos", mininterval=1.0)

  def progress(done, total):
    bar.update(done - bar.n)

  toks, mask = corpus.sample(cfg, model.params, c.rows, seq_len, bos, eos=cfg.eos_token_id,
                             temperature=c.temperature, seed=c.seed, progress=progress)
  bar.close()
  return toks, mask, f"{c.rows} rows of {seq_len} tokens sampled from the model at " \
      f"temperature {c.temperature}"


def split(n_rows: int, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, held-out rows): a seeded permutation, round(heldout * n_rows) held out, at least
  one row left to train on."""
  order = np.random.default_rng(seed + 70_000).permutation(n_rows)
  n_eval = min(int(round(heldout * n_rows)), n_rows - 1)
  return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def run_record(c: TrainTranscodersConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config and the digests of its input files."""
  settings = {**dataclasses.asdict(c), "text_sha256": inputs.file_digest(c.text),
              "token_ids_sha256": inputs.file_digest(c.token_ids)}
  return files.RunRecord(BINARY, settings, ("model", "activation", "features"))


def _table(report: dict) -> str:
  head = f"{'layer':>5}  {'FVE train':>9}  {'FVE held-out':>12}  {'L0 train':>8}  " \
      f"{'L0 held-out':>11}"
  lines = [head]
  train, held = report["train"], report.get("heldout")
  for i, (fve, l0) in enumerate(zip(train["fraction_variance_explained"], train["l0"],
                                    strict=True)):
    hf = f"{held['fraction_variance_explained'][i]:.4f}" if held else "-"
    hl = f"{held['l0'][i]:.2f}" if held else "-"
    lines.append(f"{i:>5}  {fve:>9.4f}  {hf:>12}  {l0:>8.2f}  {hl:>11}")
  return "\n".join(lines)


def _metrics(fve: np.ndarray, l0: np.ndarray, n_tokens: int) -> dict:
  return {"tokens": int(n_tokens),
          "fraction_variance_explained": [round(float(v), 4) for v in fve],
          "l0": [round(float(v), 2) for v in l0]}


def train_transcoder_set(c: TrainTranscodersConfig, out: str, *, overwrite: bool = False) -> dict:
  """Run `c` and write its outputs to `out` (see the module docstring); prints the per-layer table
  and returns the report (`training.json`'s contents)."""
  _check(c, out)
  model = inputs.load_model(toy.TOY_MLP_DIR if c.model == toy.TOY_MLP else c.model, c.dtype,
                            c.tokenizer or None)
  record = run_record(c)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as out_dir:
    if out_dir.complete:
      inputs.already_complete(out, record)
      with open(os.path.join(out, REPORT_FILE)) as fh:
        return json.load(fh)
    t0 = time.time()
    toks, mask, source = load_rows(c, model)
    train_rows, eval_rows = split(len(toks), c.heldout, c.seed)
    opts = training.TrainOptions(d_transcoder=c.features, activation=c.activation,
                                 skip=c.skip, sparsity=c.sparsity, learning_rate=c.lr,
                                 steps=c.steps, batch_size=c.batch_size, seed=c.seed)
    bar = tqdm(total=c.steps, desc="train", unit="step", mininterval=1.0)
    result = training.train_transcoders(
        model.cfg, model.params, jnp.asarray(toks[train_rows]), opts,
        attention_mask=jnp.asarray(mask[train_rows]),
        progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    tc = result.transcoders.astype(DTYPES[c.dtype])
    n_train = int(mask[train_rows][:, 1:].sum())
    report = {"settings": record.settings, "source": source,
              "rows": {"train": len(train_rows), "heldout": len(eval_rows)},
              "train": _metrics(result.fraction_variance_explained, result.l0, n_train),
              "final_loss": float(result.losses[-1])}
    if len(eval_rows) and mask[eval_rows][:, 1:].any():
      sites = hooks.sites_for(model.cfg, opts.input_hook, opts.output_hook)
      x, y = training.collect_activations(model.cfg, model.params, jnp.asarray(toks[eval_rows]),
                                          sites, jnp.asarray(mask[eval_rows]))
      report["heldout"] = _metrics(*training.evaluate(tc, x, y), x.shape[1])
    report["seconds"] = round(time.time() - t0, 1)
    with out_dir.writing(["config.yaml", REPORT_FILE] +
                         [f"layer_{i}.safetensors" for i in range(tc.n_layers)]):
      saving.save_transcoder_set(tc, out, model_name=c.model)
      files.atomic_write_json(os.path.join(out, REPORT_FILE), report)
  print(f"{source}: {report['rows']['train']} rows ({n_train} tokens) trained, "
        f"{report['rows']['heldout']} held out")
  print(_table(report))
  print(f"wrote {out} (train: fraction of variance explained and L0 of the float32 transcoders on "
        f"their training tokens; held-out: of the saved {c.dtype} set)")
  return report
