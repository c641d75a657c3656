"""`runtime.inputs`: --tokenizer for a model without one, --dtype, and the warnings of
`load_dataset` (fewer usable rows than --n_examples, answers the model never predicts)."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from jaxinterp.runtime import inputs
from tests.conftest import SHARED, requires_shared

TINYSTORIES = SHARED / "models" / "tinystories-656k"
PROMPT = "Tom and Sue went to the park. {} gave the ball to"


def _warnings(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("warning: ")]


@pytest.fixture
def bare_model(tmp_path):
  """The TinyStories model's weights and config, without its tokenizer files."""
  d = tmp_path / "bare"
  os.makedirs(d)
  for name in ("config.json", "model.safetensors"):
    shutil.copyfile(TINYSTORIES / name, d / name)
  return str(d)


def _csv(tmp_path, rows: int) -> str:
  lines = [f"{PROMPT.format(a)},{PROMPT.format(b)},{i},{j}"
           for a, b, i, j in [("Tom", "Sue", 1066, 380), ("Sue", "Tom", 380, 1066)] * rows][:rows]
  path = tmp_path / "names.csv"
  path.write_text("clean,corrupted,correct_idx,incorrect_idx\n" + "\n".join(lines) + "\n")
  return str(path)


@requires_shared
def test_tokenizer_for_a_model_without_one(bare_model, tmp_path):
  csv = _csv(tmp_path, 2)
  model = inputs.load_model(bare_model)
  with pytest.raises(inputs.InputError, match=r"has no tokenizer.json; .*--tokenizer=PATH"):
    inputs.load_dataset(model, bare_model, "logit-diff", csv, 2)
  own = inputs.load_dataset(inputs.load_model(str(TINYSTORIES)), "ts", "logit-diff", csv, 2)
  for tok in (str(TINYSTORIES / "tokenizer.json"), str(TINYSTORIES)):  # a file or its directory
    m = inputs.load_model(bare_model, tokenizer=tok)
    data = inputs.load_dataset(m, bare_model, "logit-diff", csv, 2)
    assert inputs.dataset_hash(data) == inputs.dataset_hash(own)
  with pytest.raises(inputs.InputError, match=r"--tokenizer=.*nope: no such file or directory"):
    inputs.load_model(bare_model, tokenizer=str(tmp_path / "nope"))
  with pytest.raises(inputs.InputError, match=r"--tokenizer=.*: no tokenizer.json in this"):
    inputs.load_model(bare_model, tokenizer=str(tmp_path))


@requires_shared
def test_more_examples_than_rows_warns_once(tmp_path, capsys):
  model = inputs.load_model(str(TINYSTORIES))
  csv = _csv(tmp_path, 2)
  capsys.readouterr()
  assert len(inputs.load_dataset(model, "ts", "logit-diff", csv, 5).clean) == 2
  warnings = _warnings(capsys.readouterr().err)
  assert f"--n_examples=5 is more than the 2 usable rows of --data={csv}; using 2" in warnings[0]
  # The rare-answer hint names a leading space on the answer and a trailing one on the prompt.
  assert len(warnings) == 2 and "in no prompt's top-50" in warnings[1]
  assert "trailing space on the prompt" in warnings[1] and "SentencePiece" in warnings[1]
  inputs.load_dataset(model, "ts", "logit-diff", csv, 2)
  assert not any("--n_examples" in w for w in _warnings(capsys.readouterr().err))


def test_dtype_keeps_or_casts_and_refuses_unknown():
  f32 = inputs.load_model(inputs.TOY)
  assert {x.dtype for x in jax.tree.leaves(f32.params)} == {jnp.dtype(jnp.float32)}
  assert inputs.model_hash(inputs.load_model(inputs.TOY, "float32")) == inputs.model_hash(f32)
  bf = inputs.load_model(inputs.TOY, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf.params)} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(inputs.InputError, match=r"--dtype=float16: choose from float32, bfloat16"):
    inputs.load_model(inputs.TOY, "float16")
