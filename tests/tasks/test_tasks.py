"""Task loaders, batching, error cases, task metrics and generators."""

import csv
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxinterp import tasks
from jaxinterp.tasks import TaskError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GPT2_TOK = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"
EAP = SHARED / "data" / "eap-ig"
needs_shared = pytest.mark.skipif(not GPT2_TOK.exists(),
                                  reason="../shared (GPT-2 tokenizer, EAP-IG data) absent")

WORDS = ["[UNK]", "<bos>", "the", "a", "cat", "cats", "dog", "dogs", "sat", "is", "are", "and",
         "big", "red", "Paris", "France", "Rome", "Italy", "of", "capital", ",", "animals", "pets",
         "x"]


@pytest.fixture(scope="module")
def wtok():
  """A tiny whitespace word-level tokenizer: one token per word, `<bos>` = 1, vocab 24."""
  t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  return t


@pytest.fixture(scope="module")
def gpt2():
  if not GPT2_TOK.exists():
    pytest.skip("../shared absent")
  return Tokenizer.from_file(str(GPT2_TOK))


def W(word):
  return WORDS.index(word)


def write(tmp_path, header, rows, name="data.csv"):
  p = tmp_path / name
  with open(p, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return p


def read_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# The shared EAP-IG CSVs


@needs_shared
@pytest.mark.parametrize("name", ["ioi", "greater-than", "gender-bias"])
def test_shared_csv_tokenisation(name, gpt2):
  path = EAP / name / "gpt2.csv"
  ds = tasks.load_task(name, path, gpt2)
  rows = read_rows(path)
  assert len(ds) == len(rows)
  assert ds.clean.dtype == np.int32 and ds.clean.shape == ds.corrupted.shape
  assert ds.clean.shape[1] == ds.lengths.max()
  assert np.all(ds.clean[:, 0] == 50256) and np.all(ds.corrupted[:, 0] == 50256)
  for i in range(0, len(rows), 97):  # spot-check against an independent encoding
    c = gpt2.encode(rows[i]["clean"], add_special_tokens=False).ids
    k = gpt2.encode(rows[i]["corrupted"], add_special_tokens=False).ids
    assert ds.lengths[i] == len(c) + 1 == len(k) + 1
    np.testing.assert_array_equal(ds.clean[i, 1:ds.lengths[i]], c)
    np.testing.assert_array_equal(ds.corrupted[i, 1:ds.lengths[i]], k)
    assert np.all(ds.clean[i, ds.lengths[i]:] == ds.pad_id)
  b = next(ds.batches(8))
  np.testing.assert_array_equal(np.asarray(b.last), ds.lengths[:8] - 1)


@needs_shared
def test_shared_ioi_labels(gpt2):
  path = EAP / "ioi" / "gpt2.csv"
  ds = tasks.load_task("ioi", path, gpt2, n_examples=200)
  rows = read_rows(path)[:200]
  assert len(ds) == 200
  np.testing.assert_array_equal(ds.labels["correct"], [int(r["correct_idx"]) for r in rows])
  np.testing.assert_array_equal(ds.labels["incorrect"], [int(r["incorrect_idx"]) for r in rows])
  for i in range(200):  # the IO and S names occur in the clean prompt
    toks = set(ds.clean[i, :ds.lengths[i]].tolist())
    assert ds.labels["correct"][i] in toks and ds.labels["incorrect"][i] in toks


@needs_shared
def test_shared_greater_than_labels(gpt2):
  ds = tasks.load_task("greater-than", EAP / "greater-than" / "gpt2.csv", gpt2, n_examples=100)
  year_ids = tasks.year_token_ids(gpt2)
  assert [gpt2.decode([int(t)]) for t in year_ids[[0, 7, 52, 99]]] == ["00", "07", "52", "99"]
  np.testing.assert_array_equal(ds.labels["year_ids"][5], year_ids)
  for i in range(100):  # the clean prompt contains YY as a token, the corrupted one contains 01
    yy = ds.labels["threshold"][i]
    assert year_ids[yy] in ds.clean[i, :ds.lengths[i]]
    assert year_ids[1] in ds.corrupted[i, :ds.lengths[i]]


@needs_shared
def test_shared_gender_bias_labels(gpt2):
  ds = tasks.load_task("gender-bias", EAP / "gender-bias" / "gpt2.csv", gpt2)
  answers = {gpt2.decode([int(t)])
             for t in np.concatenate([ds.labels["correct"], ds.labels["incorrect"]])}
  assert answers <= {" he", " she", " they"} and {" he", " she"} <= answers
  assert np.all(ds.labels["correct"] != ds.labels["incorrect"])


# --------------------------------------------------------------------------------------------------
# Loading, batching, padding


@pytest.fixture
def small_ds(tmp_path, wtok):
  rows = [["the cat sat", "the dog sat", W("is"), W("are")],
          ["the big red cat sat", "the big red dog sat", W("are"), W("is")],
          ["a cat", "a dog", W("cat"), W("dog")],
          ["the cat and the dog sat", "the dog and the cat sat", W("sat"), W("is")],
          ["cat", "dog", W("a"), W("the")]]
  return tasks.load_task(
      "ioi", write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"], rows), wtok)


def test_load_pads_and_prepends_bos(small_ds):
  ds = small_ds
  np.testing.assert_array_equal(ds.lengths, [4, 6, 3, 7, 2])
  assert ds.bos_id == 1 and ds.pad_id == 1 and ds.clean.shape == (5, 7)
  np.testing.assert_array_equal(ds.clean[0], [1, W("the"), W("cat"), W("sat"), 1, 1, 1])
  np.testing.assert_array_equal(ds.corrupted[2], [1, W("a"), W("dog"), 1, 1, 1, 1])
  np.testing.assert_array_equal(ds.labels["correct"],
                                [W("is"), W("are"), W("cat"), W("sat"), W("a")])


def test_no_bos_and_explicit_bos(tmp_path, wtok):
  p = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
            [["the cat", "a dog", 2, 3]])
  ds = tasks.load_task("ioi", p, wtok, prepend_bos=False)
  np.testing.assert_array_equal(ds.clean, [[W("the"), W("cat")]])
  assert ds.bos_id is None and ds.lengths[0] == 2
  ds = tasks.load_task("ioi", p, wtok, bos_id=23)
  np.testing.assert_array_equal(ds.clean[0], [23, W("the"), W("cat")])


def test_batches_buckets_and_filler_rows(small_ds):
  bs = list(small_ds.batches(2, bucket=4))
  assert len(bs) == 3
  assert [b.clean.shape for b in bs] == [(2, 8), (2, 8), (2, 4)]
  last = bs[-1]
  np.testing.assert_array_equal(np.asarray(last.valid), [True, False])
  # the filler row copies the last real row (finite metrics), but is marked invalid
  np.testing.assert_array_equal(np.asarray(last.clean[1]), np.asarray(last.clean[0]))
  for b, rows in zip(bs, ([0, 1], [2, 3], [4, 4]), strict=True):
    np.testing.assert_array_equal(np.asarray(b.last), small_ds.lengths[rows] - 1)
    mask = np.asarray(b.mask)
    np.testing.assert_array_equal(mask.sum(1), small_ds.lengths[rows])
    assert np.all(mask[np.arange(2), np.asarray(b.last)])
    assert np.all(np.asarray(b.clean)[~mask] == small_ds.pad_id)
    np.testing.assert_array_equal(np.asarray(b.labels["correct"]), small_ds.labels["correct"][rows])
  # real rows reassemble the dataset
  got = np.concatenate([np.asarray(b.clean)[np.asarray(b.valid), :7] if b.clean.shape[1] >= 7 else
                        np.pad(np.asarray(b.clean)[np.asarray(b.valid)],
                               ((0, 0), (0, 7 - b.clean.shape[1])),
                               constant_values=small_ds.pad_id) for b in bs])
  np.testing.assert_array_equal(got, small_ds.clean)


def test_batches_single_shape_and_default_bucket(small_ds):
  assert {b.clean.shape for b in small_ds.batches(3, bucket=None)} == {(3, 7)}
  for b in small_ds.batches(5):
    assert b.clean.shape == (5, 8) and b.corrupted.shape == (5, 8) and b.mask.dtype == jnp.bool_
  big = list(small_ds.batches(16))
  assert len(big) == 1 and int(np.asarray(big[0].valid).sum()) == 5


def test_subset(small_ds):
  s = small_ds.subset(3)
  assert len(s) == 3 and s.clean.shape == (3, 6)
  np.testing.assert_array_equal(s.clean, small_ds.clean[:3, :6])
  assert len(small_ds.subset(100)) == 5
  with pytest.raises(TaskError):
    small_ds.subset(0)
  with pytest.raises(TaskError):
    next(small_ds.batches(0))


def test_task_metric_on_a_batch(small_ds):
  b = next(small_ds.batches(5))
  logits = np.random.default_rng(0).normal(size=(5, b.clean.shape[1], len(WORDS))).astype(
      np.float32)
  task = tasks.get_task("ioi")
  got = jax.jit(lambda lg, batch: task.metric(lg, batch))(jnp.asarray(logits), b)
  last, c, w = small_ds.lengths - 1, small_ds.labels["correct"], small_ds.labels["incorrect"]
  want = [logits[i, last[i], c[i]] - logits[i, last[i], w[i]] for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_registry():
  for name in ("ioi", "greater-than", "gender-bias", "sva", "country-capital", "hypernymy",
               "logit-diff"):
    assert tasks.get_task(name).name == name
  with pytest.raises(TaskError, match="unknown task 'nope'.*ioi"):
    tasks.get_task("nope")


# --------------------------------------------------------------------------------------------------
# Generic loaders: sva, country-capital, hypernymy, logit-diff


def _logits_for(ds, seed=0):
  b = next(ds.batches(len(ds), bucket=None))
  lg = np.random.default_rng(seed).normal(size=(len(ds), b.clean.shape[1], len(WORDS))).astype(
      np.float32)
  return b, lg, lg[np.arange(len(ds)), ds.lengths - 1]


def test_sva_with_verb_sets(tmp_path, wtok):
  sing, plur = json.dumps([W("is"), W("sat")]), json.dumps([W("are")])
  p = write(tmp_path, ["clean", "corrupted", "plural", "singular_idx", "plural_idx"],
            [["the cats", "the cat", 1, sing, plur], ["the dog", "the dogs", 0, sing, plur]])
  ds = tasks.load_task("sva", p, wtok)
  b, lg, at = _logits_for(ds)
  got = np.asarray(tasks.with_metric(ds.task, "logit_diff").metric(jnp.asarray(lg), b))
  want0 = at[0, W("are")] - (at[0, W("is")] + at[0, W("sat")]) / 2  # plural subject
  want1 = (at[1, W("is")] + at[1, W("sat")]) / 2 - at[1, W("are")]  # singular subject
  np.testing.assert_allclose(got, [want0, want1], rtol=1e-5)
  # The default is the paper's: summed probabilities.
  p_ = np.exp(at - at.max(-1, keepdims=True))
  p_ /= p_.sum(-1, keepdims=True)
  want = [p_[0, W("are")] - p_[0, W("is")] - p_[0, W("sat")],
          p_[1, W("is")] + p_[1, W("sat")] - p_[1, W("are")]]
  np.testing.assert_allclose(np.asarray(ds.task.metric(jnp.asarray(lg), b)), want, rtol=1e-5)


@needs_shared
def test_sva_builtin_verbs(tmp_path, gpt2):
  p = write(tmp_path, ["clean", "corrupted", "group", "plural"],
            [["The poems that the skater likes", "The poem that the skater likes", "g", 1],
             ["The song that the chef likes", "The songs that the chef likes", "g", 0]])
  ds = tasks.load_task("sva", p, gpt2)
  sing, plur = tasks.sva_verb_ids(gpt2)
  assert len(sing) == len(plur) > 20 and gpt2.decode([int(sing[0])]) == " is"
  np.testing.assert_array_equal(ds.labels["correct"][0], plur)
  np.testing.assert_array_equal(ds.labels["correct"][1], sing)
  np.testing.assert_array_equal(ds.labels["plural"], [1, 0])


def test_country_capital_logit_diff_or_log_prob(tmp_path, wtok):
  p = write(tmp_path, ["clean", "capital", "country_idx", "corrupted", "corrupted_country_idx"],
            [["Paris , the capital of", "Paris", W("France"), "Rome , the capital of", W("Italy")],
             ["Rome , the capital of", "Rome", W("Italy"), "Paris , the capital of", ""]])
  ds = tasks.load_task("country-capital", p, wtok)
  np.testing.assert_array_equal(ds.labels["incorrect"], [W("Italy"), -1])
  b, lg, at = _logits_for(ds)
  got = np.asarray(ds.task.metric(jnp.asarray(lg), b))
  lp1 = at[1] - np.log(np.exp(at[1].astype(np.float64)).sum())
  np.testing.assert_allclose(got, [at[0, W("France")] - at[0, W("Italy")], lp1[W("Italy")]],
                             rtol=1e-5)
  # without the corrupted column, every row uses log p(country)
  p2 = write(tmp_path, ["clean", "corrupted", "country_idx"],
             [["Paris , the capital of", "Rome , the capital of", W("France")]], name="c2.csv")
  assert tasks.load_task("country-capital", p2, wtok).labels["incorrect"].tolist() == [-1]


def test_hypernymy_json_sets(tmp_path, wtok):
  p = write(tmp_path, ["clean", "answers", "answers_idx", "corrupted", "corrupted_answers_idx"],
            [[", cats and other", "['animals','pets']", json.dumps([W("animals"), W("pets")]),
              ", dogs and other", f"[{W('x')}]"],
             [", dogs and other", "['pets']", f"[{W('pets')}]", ", cats and other", "[2, 3, 4]"]])
  ds = tasks.load_task("hypernymy", p, wtok)
  assert ds.labels["correct"].shape == (2, 2) and ds.labels["incorrect"].shape == (2, 3)
  np.testing.assert_array_equal(ds.labels["correct"][1], [W("pets"), -1])
  b, lg, at = _logits_for(ds)
  pr = np.exp(at.astype(np.float64))
  pr /= pr.sum(-1, keepdims=True)
  want = [pr[0, [W("animals"), W("pets")]].sum() - pr[0, W("x")],
          pr[1, W("pets")] - pr[1, [2, 3, 4]].sum()]
  np.testing.assert_allclose(ds.task.metric(jnp.asarray(lg), b), want, rtol=1e-5, atol=1e-7)


def test_logit_diff_generic_ids_and_sets(tmp_path, wtok):
  p = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
            [["the cat", "the dog", 4, "[5, 6]"], ["a cat", "a dog", "[7]", 8]])
  ds = tasks.load_task("logit-diff", p, wtok)
  assert ds.labels["correct"].shape == (2,) and ds.labels["incorrect"].shape == (2, 2)
  b, lg, at = _logits_for(ds)
  want = [at[0, 4] - (at[0, 5] + at[0, 6]) / 2, at[1, 7] - at[1, 8]]
  np.testing.assert_allclose(ds.task.metric(jnp.asarray(lg), b), want, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Errors


def test_error_missing_columns(tmp_path, wtok):
  p = write(tmp_path, ["clean", "label"], [["the cat", 1]])
  # corrupted: optional
  with pytest.raises(TaskError, match="column.s. correct_idx, incorrect_idx"):
    tasks.load_task("ioi", p, wtok)
  with pytest.raises(TaskError, match="clean_answer_idx"):
    tasks.load_task("gender-bias", p, wtok)


def test_unequal_lengths_load_fitted_to_the_clean_length(tmp_path, wtok):
  p = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
            [["the cat", "the dog", 2, 3], ["the cat", "the dog", 2, 3],
             ["the big cat", "the dog", 2, 3]])
  ds = tasks.load_task("ioi", p, wtok)  # (tests/tasks/test_unequal_lengths.py: the semantics)
  assert ds.fitted == 1 and "1 of 3 rows: corrupted prompt fitted" in ds.fitted_summary
  np.testing.assert_array_equal(ds.corrupted[2], [1, W("the"), W("dog"), 1])  # fill: no pad, BOS


def test_error_ids_outside_vocab(tmp_path, wtok):
  p = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
            [["the cat", "the dog", 2, 3], ["a cat", "a dog", 2, 50256]])
  with pytest.raises(TaskError, match=r"line 3, column 'incorrect_idx'.*50256 is outside the "
                                      r"vocabulary \(size 24\)"):
    tasks.load_task("ioi", p, wtok)
  ok = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
             [["the dog", "the cat", 2, 3]], name="ok.csv")
  with pytest.raises(TaskError, match="column 'clean'.*token id 6 is outside the vocabulary "
                                      "\\(size 5\\)"):
    tasks.load_task("ioi", ok, wtok, vocab_size=5)
  with pytest.raises(TaskError, match="bos_id 99"):
    tasks.load_task("ioi", ok, wtok, bos_id=99)


def test_error_unquoted_comma_is_a_field_count_mismatch(tmp_path, wtok):
  p = tmp_path / "comma.csv"
  p.write_text("clean,corrupted,correct_idx,incorrect_idx\nthe cat,the dog,2,3\n"
               "the cat, and dog,the dog,2,3\nthe cat,the dog,2\n", encoding="utf-8")
  with pytest.raises(TaskError) as e:
    tasks.load_task("ioi", p, wtok)
  msg = str(e.value)
  assert "2 with a field count that does not match the header (lines 3, 4)" in msg
  assert "First, line 3: the row has 5 fields but the header has 4 (too many fields)" in msg
  assert "unquoted" in msg and "token lengths" not in msg and "\n" not in msg
  quoted = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
                 [["the cat , and dog", "the dog , and cat", 2, 3]], name="quoted.csv")
  assert len(tasks.load_task("ioi", quoted, wtok)) == 1  # csv.writer quotes the commas
  ragged = tmp_path / "ragged.csv"  # trailing empty fields are no mismatch
  ragged.write_text("clean,corrupted,correct_idx,incorrect_idx\nthe cat,the dog,2,3,,\n")
  assert len(tasks.load_task("ioi", ragged, wtok)) == 1


def test_rows_are_numbered_one_way_and_counts_agree(tmp_path, wtok):
  good, bad = ["the cat", "the dog", 2, 3], ["the big cat", "", 2, 3]
  p = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"],
            [good, bad, good, bad, good, good, good, bad])  # lines 2..9: bad at 3, 5, 9
  with pytest.raises(TaskError) as e:
    tasks.load_task("ioi", p, wtok, n_examples=4)
  err = str(e.value)
  assert "2 of the first 4 (of 8) rows cannot be used" in err and "(lines 3, 5)" in err
  ds = tasks.load_task("ioi", p, wtok, n_examples=4, skip_bad_rows=True)
  assert len(ds) == 4  # lines 2, 4, 6, 7: the skipped rows are the two the error names
  assert "2 of the first 6 (of 8) rows cannot be used" in ds.skipped_summary
  assert "(lines 3, 5)" in ds.skipped_summary and len(ds.skipped) == 2
  assert all(re.search(r": line \d+, ", m) for m in ds.skipped)  # the summary's numbering
  every = tasks.load_task("ioi", p, wtok, skip_bad_rows=True)
  assert "3 of 8 rows cannot be used" in every.skipped_summary and "lines 3, 5, 9" in \
      every.skipped_summary
  rows = [dict(zip(["clean", "corrupted", "correct_idx", "incorrect_idx"], r, strict=True))
          for r in (good, bad)]
  with pytest.raises(TaskError, match=r"1 of 2 rows cannot be used: .*\(row 1\)\. First, row 1, "):
    tasks.from_rows("ioi", rows, wtok)


def test_unknown_task_suggests_the_registered_spelling():
  with pytest.raises(TaskError, match=r"unknown task 'logit_diff' \(did you mean 'logit-diff'\?\)"):
    tasks.get_task("logit_diff")
  with pytest.raises(TaskError, match=r"did you mean 'greater-than'"):
    tasks.get_task("Greater_Than")
  with pytest.raises(TaskError) as e:
    tasks.get_task("zzz")
  assert "did you mean" not in str(e.value) and "known tasks" in str(e.value)
  with pytest.raises(TaskError, match=r"did you mean 'logit_diff'"):
    tasks.with_metric(tasks.get_task("ioi"), "logitdiff")


def test_error_empty_and_header_only(tmp_path, wtok):
  empty = tmp_path / "empty.csv"
  empty.write_bytes(b"")
  with pytest.raises(TaskError, match="empty"):
    tasks.load_task("ioi", empty, wtok)
  header = write(tmp_path, ["clean", "corrupted", "correct_idx", "incorrect_idx"], [], name="h.csv")
  with pytest.raises(TaskError, match="no data rows"):
    tasks.load_task("ioi", header, wtok)


def test_error_non_utf8(tmp_path, wtok):
  p = tmp_path / "latin1.csv"
  p.write_bytes("clean,corrupted,correct_idx,incorrect_idx\ncaf\xe9 cat,the dog,2,3\n".encode(
      "latin-1"))
  with pytest.raises(TaskError, match="not valid UTF-8"):
    tasks.load_task("ioi", p, wtok)


def test_error_bad_values(tmp_path, wtok):
  hdr = ["clean", "corrupted", "correct_idx", "incorrect_idx"]
  with pytest.raises(TaskError, match=r"line 2, column 'correct_idx'.*expected an integer"):
    tasks.load_task("ioi", write(tmp_path, hdr, [["the cat", "the dog", "cat", 3]]), wtok)
  with pytest.raises(TaskError, match="negative"):
    tasks.load_task("ioi", write(tmp_path, hdr, [["the cat", "the dog", -2, 3]]), wtok)
  with pytest.raises(TaskError, match="prompt is empty"):
    tasks.load_task("ioi", write(tmp_path, hdr, [["", "", 2, 3]]), wtok)
  with pytest.raises(TaskError, match="too few fields"):
    tasks.load_task("ioi", write(tmp_path, hdr, [["the cat", "the dog", 2]]), wtok)
  with pytest.raises(TaskError, match="JSON list"):
    tasks.load_task("logit-diff", write(tmp_path, hdr, [["the cat", "the dog", "[2, ", 3]]), wtok)
  with pytest.raises(TaskError, match="answer set is empty"):
    tasks.load_task("logit-diff", write(tmp_path, hdr, [["the cat", "the dog", "[]", 3]]), wtok)
  with pytest.raises(TaskError, match="two-digit year 0..99"):
    tasks.load_task("greater-than", write(tmp_path, hdr[:3], [["the cat", "the dog", 100]]), wtok)
  with pytest.raises(TaskError, match="0 \\(singular\\) or 1"):
    tasks.load_task("sva", write(tmp_path, ["clean", "corrupted", "plural"], [["a", "x", 2]]), wtok)
  with pytest.raises(TaskError, match="cannot read"):
    tasks.load_task("ioi", tmp_path / "missing.csv", wtok)
  with pytest.raises(TaskError, match="unknown task"):
    tasks.load_task("iot", tmp_path / "missing.csv", wtok)


def test_error_greater_than_needs_single_token_years(tmp_path, wtok):
  p = write(tmp_path, ["clean", "corrupted", "correct_idx"], [["the cat", "the dog", 52]])
  with pytest.raises(TaskError, match="two-digit year"):
    tasks.load_task("greater-than", p, wtok)


HEADERS = st.lists(st.sampled_from(["clean", "corrupted", "correct_idx", "incorrect_idx", "", "x"]),
                   min_size=0, max_size=5)
CELL = st.one_of(st.sampled_from(["the cat", "a dog sat", "2", "-1", "99999", "[3, 4]", "[]", "nan",
                                  "1e3", "", "\"", "[\"a\"]", "7.0"]), st.text(max_size=12))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=HEADERS, rows=st.lists(st.lists(CELL, max_size=5), max_size=4),
       name=st.sampled_from(["ioi", "logit-diff", "sva", "hypernymy", "country-capital",
                             "greater-than"]))
def test_fuzz_csv_loads_or_raises_task_error(tmp_path, wtok, header, rows, name):
  p = tmp_path / "fuzz.csv"
  with open(p, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    if header:
      w.writerow(header)
    w.writerows(rows)
  try:
    ds = tasks.load_task(name, p, wtok)
  except TaskError:
    return
  assert len(ds) >= 1 and np.all(ds.clean < len(WORDS)) and np.all(ds.lengths >= 2)


def test_csv_whose_every_row_is_bad_raises_task_error(tmp_path, wtok):
  """A case the fuzz test found: no row survives the prompt checks, so no labels are built."""
  p = tmp_path / "bad.csv"
  p.write_text("correct_idx,clean,incorrect_idx\nthe cat\n")
  with pytest.raises(TaskError, match="row"):
    tasks.load_task("logit-diff", p, wtok)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_fuzz_raw_bytes(tmp_path, wtok, data):
  p = tmp_path / "raw.csv"
  p.write_bytes(b"clean,corrupted,correct_idx,incorrect_idx\n" + data)
  try:
    tasks.load_task("ioi", p, wtok)
  except TaskError:
    pass


# --------------------------------------------------------------------------------------------------
# Generators


@needs_shared
def test_make_ioi(gpt2):
  ds = tasks.make_ioi(gpt2, 40, seed=3)
  rows = tasks.ioi_rows(gpt2, 40, seed=3)
  assert len(ds) == 40 and np.all(ds.clean[:, 0] == 50256)
  for i, r in enumerate(rows):
    c = gpt2.encode(r["clean"], add_special_tokens=False).ids
    k = gpt2.encode(r["corrupted"], add_special_tokens=False).ids
    assert len(c) == len(k) == ds.lengths[i] - 1
    io, s = ds.labels["correct"][i], ds.labels["incorrect"][i]
    # single tokens
    assert gpt2.encode(gpt2.decode([int(io)]), add_special_tokens=False).ids == [io]
    assert c.count(io) == 1 and c.count(s) == 2 and k.count(s) == 1 and k.count(io) == 1
  again = tasks.make_ioi(gpt2, 40, seed=3)
  np.testing.assert_array_equal(again.clean, ds.clean)
  assert not np.array_equal(tasks.make_ioi(gpt2, 40, seed=4).clean, ds.clean)


@needs_shared
def test_make_greater_than(gpt2):
  ds = tasks.make_greater_than(gpt2, 40, seed=0)
  rows = tasks.greater_than_rows(gpt2, 40, seed=0)
  year_ids = tasks.year_token_ids(gpt2)
  assert len(ds) == 40
  for i, r in enumerate(rows):
    yy = r["correct_idx"]
    assert 2 <= yy <= 98 and f"{yy:02d} " in r["clean"] and "01 " in r["corrupted"]
    c = ds.clean[i, :ds.lengths[i]]
    k = ds.corrupted[i, :ds.lengths[i]]
    assert year_ids[yy] in c and year_ids[1] in k
    assert np.sum(c != k) == 1  # only the YY token differs
  with pytest.raises(TaskError, match="positive"):
    tasks.make_greater_than(gpt2, 0)


def test_generators_reject_unsuitable_tokenizer(wtok):
  with pytest.raises(TaskError, match="names are single tokens"):
    tasks.make_ioi(wtok, 5)
  with pytest.raises(TaskError, match="two-digit year"):
    tasks.make_greater_than(wtok, 5)


def test_generated_rows_round_trip_through_csv(tmp_path, gpt2):
  rows = tasks.ioi_rows(gpt2, 10, seed=1)
  p = tmp_path / "ioi.csv"
  tasks.write_csv(rows, p)
  loaded = tasks.load_task("ioi", p, gpt2)
  np.testing.assert_array_equal(loaded.clean, tasks.make_ioi(gpt2, 10, seed=1).clean)


def test_make_induction():
  ds = tasks.make_induction(6, half_len=5, vocab_size=50, seed=0, bos_id=0)
  assert ds.clean.shape == (6, 10) and np.all(ds.lengths == 10) and np.all(ds.clean[:, 0] == 0)
  np.testing.assert_array_equal(ds.clean[:, 6:], ds.clean[:, 1:5])  # second half repeats the first
  np.testing.assert_array_equal(ds.corrupted[:, 6:], ds.clean[:, 6:])  # same query tokens
  np.testing.assert_array_equal(ds.corrupted[:, 0], ds.clean[:, 0])
  np.testing.assert_array_equal(ds.labels["target"], ds.clean[:, 5])
  # the first occurrence is replaced by fresh tokens
  for c, x in zip(ds.clean, ds.corrupted, strict=True):
    assert not np.any(np.isin(x[1:6], c[1:6]))
  b = next(ds.batches(4))
  lg = jnp.zeros((4, b.clean.shape[1], 50))
  np.testing.assert_allclose(ds.task.metric(lg, b), -np.log(50.0), rtol=1e-6)
