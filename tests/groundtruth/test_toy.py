"""The bundled toy induction model, its data generators and the script that trains it."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.groundtruth import toy, toy_training
from jaxinterp.runtime import inputs


@pytest.fixture(scope="module")
def model():
  return toy.load_toy()


@pytest.fixture(scope="module")
def meta():
  return toy.toy_metadata()


@pytest.fixture(scope="module")
def data():
  return toy.induction_dataset(64, seed=123)


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_checkpoint_loads(model, meta):
  assert model.cfg.family == "gpt2" and model.cfg.positional == "learned"
  assert model.cfg.n_layers == 2
  assert model.cfg.d_vocab == meta["n_tokens"] + 1 and model.cfg.bos_token_id == meta["bos_id"]
  assert _dir_bytes(toy.TOY_MODEL_DIR) < 3 * 2**20
  same = models.from_pretrained(toy.TOY_MODEL_DIR)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(same.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("prev_token_head", "induction_head"):
    layer, head = meta[key]
    assert 0 <= head < model.cfg.n_heads
  assert meta["prev_token_head"][0] == 0 and meta["induction_head"][0] == 1
  if meta["flags"]["attn_only"]:  # frozen MLPs output exactly zero
    for layer in range(model.cfg.n_layers):
      assert not np.any(np.asarray(model.params[f"blocks_{layer}"]["mlp"]["W_out"]))


def test_predicts_repeated_half(model, meta):
  """Fresh training-distribution rows (random prefix and gap): the second copy is predicted."""
  rng = np.random.default_rng(99)
  L = meta["flags"]["seq_len"]
  tokens, mask = toy.repeated_batch(rng, 64, L, meta["flags"]["min_seq_len"], meta["n_tokens"],
                                    meta["bos_id"])
  logits = model(tokens)
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  tgt = tokens[:, 1:]
  pred = np.asarray(jnp.argmax(logits[:, :-1], -1))
  acc = (pred == tgt)[mask].mean()
  nll = -np.take_along_axis(np.asarray(logp), tgt[..., None], -1)[..., 0][mask].mean()
  assert acc > 0.95, acc
  assert nll < 0.3, nll
  # Tokens that have not been seen before are not predictable: accuracy there is near chance.
  assert (pred == tgt)[~mask].mean() < 0.2


def test_induction_prompts_accuracy(model, data):
  logits = model(data["clean"])
  assert (np.asarray(jnp.argmax(logits[:, -1], -1)) == data["correct"]).mean() > 0.95


def test_attention_heads(model, meta, data):
  (l0, h0), (l1, h1) = meta["prev_token_head"], meta["induction_head"]
  _, cache = model.run_with_cache(data["clean"], [f"blocks.{l0}.attn.hook_pattern",
                                                  f"blocks.{l1}.attn.hook_pattern"])
  P = data["clean"].shape[1]
  L = P // 2
  prev = np.asarray(cache[f"blocks.{l0}.attn.hook_pattern"])[:, h0]  # [batch, q, k]
  q = np.arange(1, P)
  assert prev[:, q, q - 1].mean() > 0.5
  ind = np.asarray(cache[f"blocks.{l1}.attn.hook_pattern"])[:, h1]
  # Second-copy position q holds r_{q-L}; its earlier occurrence is at q-L, the next token at q-L+1.
  q2 = np.arange(L + 1, P)
  score = ind[:, q2, q2 - L + 1].mean()
  assert score > 0.8, score
  # The other heads of layer 0 are less previous-token-like than the chosen one.
  others = [h for h in range(model.cfg.n_heads) if h != h0]
  all_prev = np.asarray(cache[f"blocks.{l0}.attn.hook_pattern"])[:, :, q, q - 1].mean((0, 2))
  assert all(all_prev[h] < all_prev[h0] for h in others)


@pytest.mark.parametrize("corrupt", toy.CORRUPTIONS)
def test_logit_diff_clean_vs_corrupted(model, corrupt):
  d = toy.induction_dataset(64, seed=7, corrupt=corrupt)
  b = np.arange(64)

  def ld(tokens):
    last = np.asarray(model(tokens)[:, -1])
    return last[b, d["correct"]] - last[b, d["incorrect"]]

  clean, corrupted = ld(d["clean"]).mean(), ld(d["corrupted"]).mean()
  assert clean > 6.0, clean
  assert abs(corrupted) < 1.5, corrupted


def test_induction_dataset_structure(meta):
  for corrupt in toy.CORRUPTIONS:
    d = toy.induction_dataset(32, seq_len=7, seed=3, corrupt=corrupt)
    clean, cor = d["clean"], d["corrupted"]
    assert clean.shape == cor.shape == (32, 14) and clean.dtype == np.int32
    assert d["correct"].shape == d["incorrect"].shape == (32,)
    assert (clean[:, 0] == meta["bos_id"]).all() and (cor[:, 0] == meta["bos_id"]).all()
    np.testing.assert_array_equal(clean[:, 8:], clean[:, 1:7])  # second half repeats r_1..r_6
    np.testing.assert_array_equal(d["correct"], clean[:, 7])
    for row_c, row_x, c, w in zip(clean, cor, d["correct"], d["incorrect"], strict=True):
      assert len(set(row_c[1:8])) == 7  # r has distinct tokens
      assert w not in row_c and w not in row_x
      assert c not in row_x[1:] if corrupt == "first_half" else c not in row_x[8:]
    # The replaced half is fresh tokens s, disjoint from the block r of the same row.
    if corrupt == "first_half":
      np.testing.assert_array_equal(cor[:, 8:], clean[:, 8:])
      fresh = cor[:, 1:8]
    else:
      np.testing.assert_array_equal(cor[:, :8], clean[:, :8])
      fresh = cor[:, 8:]
    assert not any(np.isin(f, r).any() for f, r in zip(fresh, clean[:, 1:8], strict=True))
  a, b = toy.induction_dataset(5, seed=1), toy.induction_dataset(5, seed=1)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["clean"], toy.induction_dataset(5, seed=2)["clean"])
  assert toy.induction_dataset(2)["clean"].shape[1] == 2 * meta["block_len"]


def test_induction_dataset_errors():
  with pytest.raises(toy.ToyDataError, match="corruption"):
    toy.induction_dataset(4, corrupt="middle")
  with pytest.raises(toy.ToyDataError, match="seq_len"):
    toy.induction_dataset(4, seq_len=1)
  with pytest.raises(toy.ToyDataError, match="context"):
    toy.induction_dataset(4, seq_len=40)
  with pytest.raises(toy.ToyDataError, match="n="):
    toy.induction_dataset(0)
  with pytest.raises(toy.ToyDataError, match="collides"):
    toy.induction_dataset(4, seq_len=4, n_tokens=20, bos_id=3)


def test_repeated_batch_targets_are_induction():
  rng = np.random.default_rng(0)
  tokens, mask = toy.repeated_batch(rng, 50, 8, 2, 30, 30)
  assert tokens.shape == (50, 17) and mask.shape == (50, 16)
  offsets = set()
  for row, m in zip(tokens, mask, strict=True):
    ps = np.nonzero(m)[0]
    assert len(ps) >= 1
    for p in ps:  # the target is the token after the earlier occurrence of the current token
      prev = list(row[:p]).index(row[p])
      assert row[prev + 1] == row[p + 1]
    assert len(set(row.tolist())) == len(row) - len(ps) - 1  # only the block repeats
    offsets.add(int(np.argmax(row[1:] == row[ps[0]])))
  assert len(offsets) > 1  # the repeat's position varies
  fixed, fmask = toy.repeated_batch(rng, 4, 5, 5, 30, 30, random_layout=False)
  np.testing.assert_array_equal(fixed[:, 6:], fixed[:, 1:6])
  assert fmask[:, 6:10].all() and not fmask[:, :6].any()


def test_induction_task_dataset(model):
  tasks = pytest.importorskip("jaxinterp.tasks")
  ds = toy.induction_task_dataset(16, seed=5)
  assert isinstance(ds, tasks.Dataset) and len(ds) == 16
  assert set(ds.labels) == {"correct", "incorrect"}
  batch = next(ds.batches(16, bucket=None))
  assert bool(batch.mask.all())
  clean = ds.task.metric(model(batch.clean), batch)
  corrupted = ds.task.metric(model(batch.corrupted), batch)
  assert clean.shape == (16,)
  assert float(clean.mean()) > float(corrupted.mean()) + 5.0


@pytest.mark.slow
def test_training_end_to_end(tmp_path, capsys):
  """`toy_training.train_toy_model` (the train_toy_model binary's pipeline), a few steps."""
  out = tmp_path / "toy"
  config = toy_training.ToyTrainConfig(steps=4, seq_len=5, min_seq_len=3, n_ctx=16, batch_size=8,
                                       d_model=16, n_heads=2, d_mlp=16, n_tokens=24,
                                       eval_block_len=4, log_every=2, head_l1=0.01)
  meta = toy_training.train_toy_model(config, str(out))
  m = toy.load_toy(str(out))
  assert m.cfg.d_model == 16 and m.cfg.n_ctx == 16 and m.cfg.d_vocab == 25
  assert json.loads((out / toy.METADATA_FILE).read_text()) == meta
  assert meta["flags"]["steps"] == 4 and np.isfinite(meta["final_loss"])
  assert [s for s, _, _ in meta["history"]] == [2, 4]
  assert meta["prev_token_head"][0] == 0 and meta["induction_head"][0] == 1
  d = toy.induction_dataset(3, seq_len=4, n_tokens=24, bos_id=24)
  assert np.isfinite(np.asarray(m(d["clean"]))).all()
  assert "previous-token head L0H" in capsys.readouterr().out


def test_training_rejects_bad_settings(tmp_path):
  """Each bad setting is a TrainError (an `inputs.InputError`) naming its flag, before any
  output."""
  for kw, message in [(dict(seq_len=40, n_ctx=64), "exceed --n_ctx=64"),
                      (dict(min_seq_len=1), "need 2 <= --min_seq_len (1)"),
                      (dict(d_head=0, d_model=30, n_heads=4), "not a multiple of --n_heads=4")]:
    with pytest.raises(toy_training.TrainError, match=re.escape(message)):
      toy_training.train_toy_model(toy_training.ToyTrainConfig(**kw), str(tmp_path / "out"))
  with pytest.raises(inputs.InputError, match="bundled model's directory"):
    toy_training.train_toy_model(toy_training.ToyTrainConfig(), toy.TOY_MODEL_DIR)
  cfg = toy_training.make_config(toy_training.ToyTrainConfig())
  with pytest.raises(toy_training.TrainError, match="unknown pos_init 'nope'"):
    toy_training.init(cfg, jax.random.PRNGKey(0), attn_only=True, pos_init="nope")
  assert not (tmp_path / "out").exists()
