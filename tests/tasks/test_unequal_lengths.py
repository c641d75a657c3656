"""Clean and corrupted prompts of different token lengths load with EAP-IG/MIB semantics: positions
aligned by index, the clean attention mask, a shorter corrupted prompt filled with the pad token up
to the clean length, a longer one cut after the clean prompt's last token."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxinterp import attribution, tasks
from jaxinterp.models import ModelConfig, from_pretrained, init_params
from jaxinterp.models.transformer import forward
from jaxinterp.tasks import metrics
from jaxinterp.tasks.csv_io import pad_token_id_of

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GPT2_TOK = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"

WORDS = ["[UNK]", "<bos>", "<pad>", "the", "a", "cat", "dog", "sat", "is", "are", "big", "red",
         "on", "mat", "PAD"]
W = {w: i for i, w in enumerate(WORDS)}
HEADER = ["clean", "corrupted", "correct_idx", "incorrect_idx"]
# row 1: equal; row 2: corrupted shorter by 2; row 3: corrupted longer by 2; row 4: shorter by 1
ROWS = [["the cat sat", "the dog sat", W["is"], W["are"]],
        ["the big red cat sat", "a dog sat", W["are"], W["is"]],
        ["a cat", "the big red dog", W["cat"], W["dog"]],
        ["the cat sat on the mat", "the dog sat on mat", W["sat"], W["is"]]]


@pytest.fixture(scope="module")
def tok():
  """Word-level, `<bos>` = 1 and `<pad>` = 2 (found as the pad token), vocab 15."""
  t = Tokenizer(models.WordLevel(W, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  return t


def write(tmp_path, rows, name="t.csv") -> Path:
  p = tmp_path / name
  p.write_text("\n".join(",".join(map(str, r)) for r in [HEADER, *rows]) + "\n")
  return p


def ids(text: str) -> list[int]:
  return [W[w] for w in text.split()]


def test_unequal_rows_load_fitted_with_the_pad_token(tmp_path, tok):
  ds = tasks.load_task("ioi", write(tmp_path, ROWS), tok, bos_id=W["<bos>"])
  assert ds.pad_id == 1 and ds.fill_id == 2 and ds.fitted == 3
  assert "3 of 4 rows: corrupted prompt fitted to the clean length (EAP-IG/MIB" in ds.fitted_summary
  assert "2 shorter filled with the pad token 2 (lines 3, 5)" in ds.fitted_summary
  assert "1 longer cut after the clean prompt's last token (line 4)" in ds.fitted_summary
  np.testing.assert_array_equal(ds.lengths, [4, 6, 3, 7])  # the clean lengths, BOS included
  np.testing.assert_array_equal(ds.corrupted, [
      [1] + ids("the dog sat") + [1, 1, 1],
      [1] + ids("a dog sat") + [2, 2, 1],             # filled to the clean length, then padding
      [1] + ids("the big") + [1, 1, 1, 1],             # cut after the clean last token
      [1] + ids("the dog sat on mat") + [2]])
  b = next(ds.batches(4, bucket=None))
  np.testing.assert_array_equal(b.corrupted, ds.corrupted)
  np.testing.assert_array_equal(b.mask, np.arange(7)[None] < ds.lengths[:, None])  # the clean mask
  np.testing.assert_array_equal(b.last, ds.lengths - 1)
  # equal lengths: nothing fitted, nothing recorded; an explicit pad token wins
  same = tasks.load_task("ioi", write(tmp_path, ROWS[:1], "s.csv"), tok, bos_id=1)
  assert same.fitted == 0 and same.fitted_summary == "" and same.fill_id is None
  given = tasks.load_task("ioi", write(tmp_path, ROWS), tok, bos_id=1, pad_token_id=W["PAD"])
  assert given.fill_id == W["PAD"] and given.corrupted[1, 4] == W["PAD"]
  with pytest.raises(tasks.TaskError, match="pad token id 99 .* outside the vocabulary"):
    tasks.load_task("ioi", write(tmp_path, ROWS), tok, bos_id=1, pad_token_id=99)
  # other bad rows keep their messages
  with pytest.raises(tasks.TaskError, match=r"1 with an empty prompt \(line 3\)"):
    tasks.load_task("ioi", write(tmp_path, [ROWS[0], ["the cat", "", 8, 9]], "e.csv"), tok,
                    bos_id=1)


def test_pad_token_as_transformer_lens_pads(tmp_path, tok):
  class HFLike:  # a transformers tokenizer without a pad token: TransformerLens pads with EOS
    pad_token_id, eos_token_id = None, 7

  assert pad_token_id_of(tok) == 2 and pad_token_id_of(HFLike()) == 7
  # the model directory's transformers files name the pad token (else EOS), as AutoTokenizer reads
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "mat"}}))
  assert pad_token_id_of(tok, config_dir=tmp_path) == W["mat"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "PAD"}))
  assert pad_token_id_of(tok, config_dir=tmp_path) == W["PAD"]
  ds = tasks.load_task("ioi", write(tmp_path, ROWS), tmp_path, bos_id=1)  # a tokenizer by path
  assert ds.fill_id == W["PAD"] and ds.corrupted[1, 4] == W["PAD"]
  bare = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "x": 2}, unk_token="[UNK]"))
  assert pad_token_id_of(bare, bos_id=1) == 1  # no pad, no EOS: BOS
  if GPT2_TOK.exists():
    assert pad_token_id_of(Tokenizer.from_file(str(GPT2_TOK))) == 50256


def test_eap_ig_inputs_scores_equal_those_of_prompts_fitted_by_hand(tmp_path, tok):
  cfg = ModelConfig(family="gpt2", d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32,
                    d_vocab=len(WORDS), n_ctx=16)
  params = init_params(cfg, jax.random.PRNGKey(0))
  unequal = tasks.load_task("ioi", write(tmp_path, ROWS), tok, bos_id=1, pad_token_id=W["PAD"])
  by_hand = [[c, " ".join((k.split() + ["PAD"] * 9)[:len(c.split())]), a, b]
             for c, k, a, b in ROWS]
  equal = tasks.load_task("ioi", write(tmp_path, by_hand, "h.csv"), tok, bos_id=1)
  assert unequal.fitted == 3 and equal.fitted == 0
  np.testing.assert_array_equal(unequal.corrupted, equal.corrupted)
  got, want = (attribution.attribute(cfg, params, d, "EAP-IG-inputs", ig_steps=2, batch_size=4,
                                     quiet=True) for d in (unequal, equal))
  np.testing.assert_array_equal(np.asarray(got.scores), np.asarray(want.scores))
  assert np.abs(np.asarray(got.scores)).max() > 0


@pytest.mark.slow  # builds and saves an HF GPT-2 (about 13 s)
def test_corrupted_logits_match_hf_with_the_clean_mask(tmp_path, tok, hf_gpt2_dir):
  torch = pytest.importorskip("torch")
  path, hf = hf_gpt2_dir
  model = from_pretrained(path)
  ds = tasks.load_task("ioi", write(tmp_path, ROWS), tok, bos_id=1, vocab_size=97)
  assert ds.fill_id == W["<pad>"]
  b = next(ds.batches(len(ds), bucket=None))
  logits = forward(model.cfg, model.params, b.corrupted, attention_mask=b.mask)
  ours = np.asarray(metrics.last_logits(logits, b.last))  # [batch, vocab]
  # HF: the corrupted prompt as TransformerLens tokenises it (BOS, right padded with the pad token,
  # `<pad>`), not cut, under the clean attention mask (a longer one's extra tokens real too)
  width = 8
  for r, (c, k, _, _) in enumerate(ROWS):
    n_clean, toks = 1 + len(c.split()), [1] + ids(k)
    n_real = max(n_clean, len(toks))
    toks += [W["<pad>"]] * (width - len(toks))
    mask = [1] * n_real + [0] * (width - n_real)
    with torch.no_grad():
      out = hf(input_ids=torch.tensor([toks]), attention_mask=torch.tensor([mask])).logits[0]
    np.testing.assert_allclose(ours[r], out[n_clean - 1].numpy(), atol=1e-4, rtol=1e-4)


def test_mib_rows_of_unequal_lengths_load(tmp_path):
  if not GPT2_TOK.exists():
    pytest.skip("../shared/models/gpt2-tokenizer is absent")
  gpt2 = Tokenizer.from_file(str(GPT2_TOK))
  rows = [{"prompt": "Q: How much is 12 plus 7? A:", "label": 19, "operator": "+",
           "random_counterfactual": {"prompt": "Q: How much is 15 plus 9? A:", "label": 24}},
          {"prompt": "Q: How much is 3 plus 4? A:", "label": 7, "operator": "+",
           "random_counterfactual": {"prompt": "Q: What is 3 plus 5? A:", "label": 8}}]
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ds = tasks.load_mib_task("arithmetic-addition", path, gpt2)
  assert len(ds) == 2 and ds.fitted == 1 and ds.fill_id == 50256
  c = gpt2.encode(rows[1]["prompt"]).ids
  k = gpt2.encode(rows[1]["random_counterfactual"]["prompt"]).ids
  assert len(k) < len(c)
  np.testing.assert_array_equal(ds.corrupted[1, :1 + len(c)],
                                [50256] + k + [50256] * (len(c) - len(k)))
  assert ds.lengths[1] == 1 + len(c)
  want = [50256] + gpt2.encode(rows[0]["random_counterfactual"]["prompt"]).ids
  np.testing.assert_array_equal(ds.corrupted[0, :len(want)], want)  # equal lengths: as before
