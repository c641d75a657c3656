"""Issue 28's binary, `experiments.explain_attention`: the default run explains the bundled toy's
induction head, its saved table sums to the score it reports, bad input is one line and leaves
nothing behind, and --help lists every flag."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxinterp.attribution import qk
from jaxinterp.experiments import cli
from jaxinterp.experiments import explain_attention as binary
from jaxinterp.runtime import files
from tests.experiments.test_binaries import _cmd, _one_line_error, _run_all

FLAGS = flags.FLAGS
OWN_FLAGS = ("model", "tokenizer", "transcoders", "head", "prompt", "corrupted", "data", "task",
             "row", "query_pos", "key_pos", "top_k", "out", "overwrite")


@pytest.fixture(scope="module", autouse=True)
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(["test"])


def _score(stdout: str, which: str = "pre-softmax score") -> float:
  return float(re.search(rf"{which} ([+-]\d+\.\d+)", stdout).group(1))


def test_default_run_explains_the_induction_head_and_the_table_sums_to_the_score(tmp_path,
                                                                                 capsys):
  out = str(tmp_path / "qk")
  with flagsaver.flagsaver(out=out):
    binary.main(["explain_attention"])
  printed = capsys.readouterr().out
  # the toy's induction prompt row 0: the last token (31) attends to the token after its earlier
  # occurrence (16), through the previous-token head a0.h3 on the key side
  assert printed.startswith("a1.h0 on toy (32 tokens): query 31 (62) -> key 16 (69)")
  assert "key terms, at their keys, raising the score most: a0.h3@16" in printed
  assert re.search(r"check: the table \(9 x 9 terms\) .* \(ok\)", printed)
  assert "bias terms: b_O (query)" in printed and "b_K (key)" in printed
  saved = np.load(os.path.join(out, "qk.npz"))
  assert str(saved["head"]) == "a1.h0" and (int(saved["query"]), int(saved["key"])) == (31, 16)
  assert saved["table"].shape == (len(saved["query_names"]), len(saved["key_names"]))
  np.testing.assert_allclose(saved["table"].sum(), saved["score"], atol=1e-5)
  np.testing.assert_allclose(saved["score"], _score(printed), atol=5e-5)  # as printed, 4 places
  key_totals = dict(zip(saved["key_names"].tolist(), saved["table"].sum(0), strict=True))
  assert max(key_totals, key=key_totals.get) == "a0.h3"
  assert sorted(os.listdir(out)) == ["DONE", "qk.npz", "qk.png", "run.json"]
  assert files.read_run_record(out).settings["head"] == "a1.h0"
  # the heatmap's grid: 3 terms a side and "other", without m0 (0 throughout: attention-only)
  t = qk.QKTable("a1.h0", 31, 16, tuple(saved["query_names"].tolist()),
                 tuple(saved["key_names"].tolist()), saved["table"], float(saved["score"]), 1.0)
  values, rows, cols = qk.top_grid(t, 3)
  assert values.shape == (4, 4) and rows[-1] == "other (5)" and cols[-1] == "other (5)"
  assert "a0.h3" in cols and "m0" not in rows + cols
  np.testing.assert_allclose(values.sum(), t.score, atol=1e-5)

  # the same run again is complete; other settings are refused unless --overwrite
  with flagsaver.flagsaver(out=out):
    binary.main(["explain_attention"])
  assert "complete" in capsys.readouterr().out
  with flagsaver.flagsaver(out=out, corrupted="row", top_k=4):
    with pytest.raises(ValueError, match="other settings"):
      binary.main(["explain_attention"])
    assert capsys.readouterr().out == ""  # refused before anything is computed or printed
    FLAGS.overwrite = True
    binary.main(["explain_attention"])
  printed = capsys.readouterr().out
  patched = np.load(os.path.join(out, "qk.npz"))
  for side in ("clean", "corrupted"):
    np.testing.assert_allclose(patched[f"{side}_table"].sum(), patched[f"{side}_score"],
                               atol=1e-5)
  np.testing.assert_allclose(patched["table"].sum(), patched["clean_score"] -
                             patched["corrupted_score"], atol=1e-5)
  assert printed.count("(ok)") == 3 and _score(printed, "clean score") > 0
  assert sorted(os.listdir(out)) == ["DONE", "qk.npz", "qk.png", "run.json"]


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
  """The binary as `cli.run` runs it, in this process: (exit status, stdout, stderr)."""
  monkeypatch.setattr(sys, "argv", ["explain_attention", *args])
  with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
    cli.run(binary.main, binary.__name__)
  captured = capsys.readouterr()
  return e.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("args, needle", [
    (("--head=a2.h0",), "head a2.h0 is not in the model (2 layers of 4 heads)"),
    (("--head=L1H0",), "expected a name like 'a1.h0'"),
    (("--query_pos=5", "--key_pos=9"), "key position 9 is after query position 5"),
    (("--key_pos=32",), "key position 32 is outside the prompt (length 32)"),
    (("--row=64",), "--row=64: out of range; the generated induction data has 64 rows"),
    (("--prompt=5 3 17 5", "--corrupted=row"), "--corrupted=row needs a --data row"),
    (("--prompt=5 3 17 5", "--corrupted=5 3"), "prompts differ in length"),
    (("--prompt=five",), "give --prompt as token ids"),
])
def test_bad_input_is_one_line_and_leaves_no_output(monkeypatch, capsys, tmp_path, args, needle):
  out = tmp_path / "new" / "out"
  status, stdout, stderr = _run(monkeypatch, capsys, *args, f"--out={out}")
  assert status == 2 and stdout == "", (status, stdout)
  assert stderr.startswith("explain_attention: error: ") and stderr.count("\n") == 1, stderr
  assert needle in stderr and "Traceback" not in stderr
  assert not (tmp_path / "new").exists()  # the held --out (and its parent) are removed again


def test_help_lists_every_flag(monkeypatch, capsys):
  status, stdout, stderr = _run(monkeypatch, capsys, "--help")
  assert status == 0 and stderr == ""
  own, shared = stdout.split("shared flags:")
  for name in OWN_FLAGS:
    assert re.search(rf"^  --(\[no\])?{name}:", own, re.M), name
  assert "--compilation_cache" in shared


@pytest.mark.slow  # fresh processes; CI runs it with -m slow
def test_as_a_process_an_error_is_one_line(tmp_path):
  out = tmp_path / "out"
  bad, ok = _run_all([_cmd("explain_attention", "--query_pos=5", "--key_pos=9", f"--out={out}"),
                      _cmd("explain_attention", f"--out={tmp_path / 'ok'}", "--key_pos=15",
                           "--top_k=3")])
  _one_line_error(bad, "key position 9 is after query position 5")
  assert ok.returncode == 0 and ok.stderr == "", ok.stderr[-2000:]
  assert "query 31 (62) -> key 15 (62)" in ok.stdout and "(ok)" in ok.stdout
  assert not out.exists() and (tmp_path / "ok" / "DONE").exists()
