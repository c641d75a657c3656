"""The checkpoint the reference-implementation tests share: a random-init GPT-2 with the real
GPT-2 tokenizer, saved as an HF directory that jaxinterp and the PyTorch tools both load."""

from __future__ import annotations

import pathlib
import shutil

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def write_random_gpt2(path: pathlib.Path, tokenizer: pathlib.Path) -> pathlib.Path:
  """A GPT-2 (2 layers, d_model 32, 4 heads, 64 positions, torch seed 0) at `path`, with the
  tokenizer files of the directory `tokenizer`; returns `path`."""
  import torch
  import transformers
  torch.manual_seed(0)
  conf = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)
  transformers.GPT2LMHeadModel(conf).eval().save_pretrained(path)
  for f in TOKENIZER_FILES:
    shutil.copy(tokenizer / f, path / f)
  transformers.GPT2TokenizerFast(tokenizer_file=str(path / "tokenizer.json")).save_pretrained(path)
  return path
