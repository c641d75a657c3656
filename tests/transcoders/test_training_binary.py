"""Training transcoders from the command line (`experiments/train_transcoders.py` and its run,
`transcoders.training_run`): sampling with a KV cache, the run on the bundled toy_mlp end to end
(FVE and L0 reported, the files load back and build an attribution graph), a finished --out kept,
one-line refusals that leave no directory, and the run on TinyStories (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.runtime import inputs
from jaxinterp.transcoders import corpus, toy
from jaxinterp.transcoders.pipeline import AttributionGraphConfig, attribution_graph
from jaxinterp.transcoders.training_run import TrainTranscodersConfig, train_transcoder_set
from tests.conftest import SHARED, requires_shared

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = TrainTranscodersConfig(rows=24, seq_len=16, features=32, steps=150, batch_size=128,
                               sparsity=2e-2)


@pytest.fixture(scope="module")
def toy_mlp():
  return models.from_pretrained(toy.TOY_MLP_DIR)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_kv_cache_sampling_matches_the_full_forward(toy_mlp):
  m = toy_mlp
  toks, mask = corpus.sample(m.cfg, m.params, 3, 10, 128, temperature=0.0)
  assert toks.shape == (3, 10) and (toks[:, 0] == 128).all() and mask.all()  # eos == bos: no end
  argmax = np.asarray(jnp.argmax(models.forward(m.cfg, m.params, jnp.asarray(toks)), -1))
  np.testing.assert_array_equal(argmax[:, :-1], toks[:, 1:])  # greedy: each token the argmax
  eos = int(toks[0, 4])  # rows end at their first eos, which is kept
  _, mask = corpus.sample(m.cfg, m.params, 3, 10, 128, eos=eos, temperature=0.0)
  first = [int(np.argmax(r[1:] == eos)) + 1 if (r[1:] == eos).any() else 10 for r in toks]
  np.testing.assert_array_equal(mask, np.arange(10)[None] <= np.asarray(first)[:, None])


@pytest.mark.slow  # the binary end to end (about 10 s); the library parts are tested fast above
def test_toy_run_end_to_end(toy_mlp, tmp_path, capsys):
  out = str(tmp_path / "tc")
  report = train_transcoder_set(SMALL, out)
  printed = capsys.readouterr().out
  assert "FVE held-out" in printed and "L0 train" in printed
  assert set(os.listdir(out)) == {"DONE", "run.json", "config.yaml", "training.json",
                                  "layer_0.safetensors", "layer_1.safetensors"}
  with open(os.path.join(out, "training.json")) as fh:
    assert json.load(fh) == report
  assert report["rows"] == {"train": 22, "heldout": 2}
  for part in ("train", "heldout"):
    fve, l0 = report[part]["fraction_variance_explained"], report[part]["l0"]
    assert len(fve) == len(l0) == 2 and all(0.5 < v <= 1 for v in fve), report
    assert all(0 < v < 32 for v in l0), report
  tc = T.load(out, toy_mlp.cfg)  # circuit-tracer's format, read back by the library's loader
  assert tc.d_transcoder == 32 and tc.activation == "relu"
  summary = attribution_graph(AttributionGraphConfig(transcoders=out, batch_size=64),
                              str(tmp_path / "graph"))
  assert summary["logits"] >= 1 and summary["active_features"] > 0
  assert 0 < summary["replacement_score"] <= 1
  # A finished --out is kept: the same settings are reported complete, others refused.
  mtime = os.stat(os.path.join(out, "layer_0.safetensors")).st_mtime
  assert train_transcoder_set(SMALL, out) == report
  assert "already holds" in capsys.readouterr().out
  with pytest.raises(inputs.InputError, match="other settings.*--steps.*--overwrite"):
    train_transcoder_set(dataclasses.replace(SMALL, steps=5), out)
  assert os.stat(os.path.join(out, "layer_0.safetensors")).st_mtime == mtime
  redone = train_transcoder_set(dataclasses.replace(SMALL, steps=5), out, overwrite=True)
  assert redone["settings"]["steps"] == 5 and os.path.isfile(os.path.join(out, "DONE"))


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_token_ids_and_jumprelu(toy_mlp, tmp_path):
  ids = tmp_path / "ids.txt"
  chain = toy.chain_batch(np.random.default_rng(0), 12, 14, toy.successor(), 128)[0]
  ids.write_text("\n".join(" ".join(map(str, r[1:])) for r in chain))  # BOS prepended
  c = dataclasses.replace(SMALL, token_ids=str(ids), activation="jumprelu", sparsity=1e-3,
                          heldout=0.0, dtype="bfloat16")
  report = train_transcoder_set(c, str(tmp_path / "tc"))
  assert report["train"]["tokens"] == 12 * 13 and "heldout" not in report
  assert report["source"].startswith("token ids from")
  tc = T.load(str(tmp_path / "tc"), toy_mlp.cfg)
  assert tc.activation == "jumprelu" and tc.d_transcoder == 32
  layer = T.loading.read_plt_layer(str(tmp_path / "tc" / "layer_1.safetensors"))
  assert layer["W_dec"].dtype == jnp.bfloat16  # saved in --dtype


def test_bad_input_is_one_line_and_leaves_no_directory(tmp_path):
  empty, bad_ids, text = (tmp_path / n for n in ("empty.txt", "bad_ids.txt", "text.txt"))
  empty.write_text("\n  \n")
  bad_ids.write_text("3 4 5\n7 900\n")
  text.write_text("some words\n")
  cases = [
      (dict(activation="gelu"), "--activation must be relu or jumprelu"),
      (dict(features=0), "--features=0: must be at least 1"),
      (dict(heldout=1.0), "--heldout must be in"),
      (dict(lr=0.0), "--lr must be > 0"),
      (dict(temperature=-1.0), "--temperature must be >= 0"),
      (dict(seq_len=1), "--seq_len must be 0"),
      (dict(seq_len=100), "longer than the model's context of 48"),
      (dict(dtype="float16"), "--dtype must be one of"),
      (dict(text=str(text), token_ids=str(bad_ids)), "not both"),
      (dict(text=str(tmp_path / "absent.txt")), "--text=.*no such file"),
      (dict(text=str(empty), tokenizer=os.path.join(SHARED, "models", "tinystories-656k")),
       "is empty"),
      (dict(text=str(text)), "no tokenizer.json"),
      (dict(token_ids=str(empty)), "holds no tokens"),
      (dict(token_ids=str(bad_ids)), r"row 2: token ids outside the vocabulary \[0, 129\)"),
      (dict(model=str(tmp_path / "no_model")), "--model="),
  ]
  if not SHARED.exists():
    cases = [c for c in cases if "tokenizer" not in c[0]]
  out = tmp_path / "out"
  for kw, match in cases:
    with pytest.raises((T.TranscoderError, inputs.InputError), match=match) as e:
      train_transcoder_set(dataclasses.replace(SMALL, **kw), str(out))
    assert "\n" not in str(e.value) and not out.exists(), kw
  with pytest.raises(T.TranscoderError, match="bundled transcoders' directory"):
    train_transcoder_set(SMALL, toy.TOY_TRANSCODERS_DIR)


def test_the_binary_prints_one_line_errors(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "experiments.train_transcoders", "--features=0",
                      f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "train_transcoders: error: --features=0: must be at least 1"], r.stderr[-2000:]
  assert not out.exists()


@requires_shared
def test_a_text_file_is_tokenised_in_rows_with_bos(tmp_path):
  model = os.path.join(SHARED, "models", "tinystories-656k")
  text = tmp_path / "stories.txt"
  text.write_text("Once upon a time there was a dog named Max. Max liked to run in the park.\n\n"
                  "Lily and Ben played with a ball.\n")
  tok = models.from_pretrained(model).tokenizer
  n = [len(tok.encode(line, add_special_tokens=False).ids)
       for line in text.read_text().splitlines() if line]
  c = TrainTranscodersConfig(model=model, text=str(text), seq_len=8, heldout=0.0, features=16,
                             steps=5)
  report = train_transcoder_set(c, str(tmp_path / "tc"))
  rows = sum(-(-k // 7) for k in n)  # rows of BOS + at most 7 tokens, per line
  assert report["rows"]["train"] == rows and report["train"]["tokens"] == sum(n)


@pytest.mark.slow
@requires_shared
def test_tinystories_transcoders(tmp_path):
  model = os.path.join(SHARED, "models", "tinystories-656k")
  out = str(tmp_path / "tc")
  c = TrainTranscodersConfig(model=model, rows=64, seq_len=64, features=256, steps=1000,
                             sparsity=3e-3)
  report = train_transcoder_set(c, out)
  assert report["rows"] == {"train": 58, "heldout": 6}
  for part in ("train", "heldout"):
    assert all(v > 0.6 for v in report[part]["fraction_variance_explained"]), report
    assert all(1 < v < 64 for v in report[part]["l0"]), report
  summary = attribution_graph(AttributionGraphConfig(
      model=model, transcoders=out, prompt="Once upon a time, there was a little girl named",
      batch_size=256), str(tmp_path / "graph"))
  assert summary["active_features"] > 0 and 0 < summary["replacement_score"] <= 1
