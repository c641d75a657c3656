"""SVA without the paper's verb list: one warning line naming the file looked for (issue 28)."""

import csv

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxinterp import tasks

# Words and their byte-level forms (`Ġw`), so both the built-in verbs and a verb list resolve.
WORDS = ["[UNK]", "<bos>", "the", "cat", "cats", "is", "are", "sits", "sit", "\u0120is",
         "\u0120are", "\u0120sits", "\u0120sit"]
ROWS = [["the cats", "the cat", 1], ["the cat", "the cats", 0]]


def _tokenizer():
  t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  return t


def _write(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def test_builtin_verbs_fallback_warns_once_naming_the_verb_list(tmp_path, capsys):
  data = _write(tmp_path / "sva.csv", ["clean", "corrupted", "plural"], ROWS)
  ds = tasks.load_task("sva", data, _tokenizer())
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("warning: ") and str(tmp_path / "combined_verb_list.csv") in lines[0]
  assert "built-in verb pairs" in lines[0]
  sing, plur = tasks.sva_verb_ids(_tokenizer())
  np.testing.assert_array_equal(ds.labels["correct"][0], plur)  # the fallback still applies


def test_rows_in_memory_warn_without_a_path(capsys):
  tasks.from_rows("sva", [dict(zip(["clean", "corrupted", "plural"], r, strict=True))
                          for r in ROWS], _tokenizer())
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no SVA verb list given" in err[0] and "<rows>" in err[0]


def test_verb_list_beside_the_csv_is_used_silently(tmp_path, capsys):
  _write(tmp_path / "combined_verb_list.csv", ["idx", "sing", "plur", "freq"],
         [[0, "is", "are", 9], [1, "sits", "sit", 3]])
  data = _write(tmp_path / "sva.csv", ["clean", "corrupted", "plural"], ROWS)
  ds = tasks.load_task("sva", data, _tokenizer())
  assert capsys.readouterr().err == ""
  ids = {w: i for i, w in enumerate(WORDS)}
  assert sorted(ds.labels["correct"][0].tolist()) == [ids["\u0120are"], ids["\u0120sit"]]
