"""Issue 18, "a newcomer's first hour": the binaries as a user runs them.

The checks of exit statuses and one-line errors run the binaries as subprocesses and look at their
exit status, their stderr (an error is one line, without a traceback) and the files they leave
behind; runs that do not depend on each other are started together. The rest call the pipelines
behind the binaries in-process (`report.evaluate_circuit`, `pipeline.activation_patching`), as do
the checks of the library pieces (run directories, CSV validation, plots) at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxinterp import models, patching, tasks
from jaxinterp.circuits import Graph
from jaxinterp.evaluation import faithfulness as evaluation
from jaxinterp.evaluation import report
from jaxinterp.experiments import scripts
from jaxinterp.groundtruth import toy
from jaxinterp.patching import pipeline
from jaxinterp.runtime import files, inputs
from jaxinterp.tasks import answers
from jaxinterp.viz import plots

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINYSTORIES = os.path.join(os.path.dirname(ROOT), "shared", "models", "tinystories-656k")
# Every experiments/*.py with a main() is a binary (cli, common and scripts are their plumbing).
BINARIES = tuple(sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "experiments"))
    if name.endswith(".py") and name[:-3] not in ("__init__", "cli", "common", "scripts")
    and "\ndef main(" in open(os.path.join(ROOT, "experiments", name)).read()))
LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.M)  # an absl log line
CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=40, n_ctx=32, bos_token_id=0)


def _cmd(binary: str, *args: str) -> list[str]:
  return [sys.executable, "-m", f"experiments.{binary}", *args]


def _run_all(cmds, cwd=ROOT, umask=None, at_once=4) -> list[subprocess.CompletedProcess]:
  """Run the commands, `at_once` at a time; their results in order."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = []
  for start in range(0, len(cmds), at_once):
    group = cmds[start:start + at_once]
    old = os.umask(umask) if umask is not None else None  # inherited by the children
    try:
      procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for c in group]
    finally:
      if old is not None:
        os.umask(old)
    for c, p in zip(group, procs, strict=True):
      stdout, stderr = p.communicate(timeout=600)
      out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
  return out


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit status 2 and a single stderr line `prog: error: ...` containing every needle."""
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, (r.args, r.returncode, r.stderr[-3000:])
  assert ": error: " in lines[0] and "Traceback" not in r.stderr
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


def _warnings(stderr: str) -> list[str]:
  return [line for line in stderr.replace("\r", "\n").splitlines()
          if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Two models of one shape with different weights."""
  out = []
  for seed in (0, 1):
    path = str(tmp_path_factory.mktemp(f"tiny{seed}"))
    params = models.init_params(CFG, jax.random.PRNGKey(seed))
    models.save_converted(models.Model(CFG, params), path)
    out.append(path)
  return out


# ------------------------------------------------------------------------------ items 3, 4: flags


@pytest.mark.slow  # a dozen fresh processes; CI runs it with -m slow
def test_help_lists_each_binarys_flags_and_the_shared_ones_with_status_0(tmp_path):
  binaries = BINARIES
  runs = _run_all([_cmd(b, "--help") for b in binaries] + [_cmd("find_circuit", "--helpfull")] +
                  [[os.path.join(os.path.dirname(sys.executable), "jaxinterp-evaluate-circuit"),
                    "--help"]], cwd=tmp_path)
  own = {"find_circuit": ["--method", "--[no]skip_bad_rows", "--[no]prepend_bos", "--metric"],
         "evaluate_circuit": ["--graph", "--metric", "--[no]prepend_bos", "--[no]force"],
         "activation_patching": ["--sweeps", "--direction"], "convert_checkpoint": ["--model"],
         "train_das": ["--das_steps"], "train_toy_model": ["--[no]overwrite_bundled"],
         "view": ["--graph"]}
  for b, r in zip(binaries, runs[:len(binaries)], strict=True):
    assert r.returncode == 0 and r.stderr == "", (b, r.returncode, r.stderr[-2000:])
    mine = r.stdout.split("shared flags:")[0].split(f"flags of {b}:")[1]
    for flag in own.get(b, []) + ["--out"]:
      assert f"  {flag}" in mine, (b, flag)
    shared = r.stdout.split("shared flags:")[1]
    assert "--verbosity" in shared
    if b != "view":  # the viewer runs no model
      assert "--compilation_cache" in shared
  full, console = runs[len(binaries):]
  assert full.returncode == 0 and "absl.flags" in full.stdout
  assert console.returncode == 0 and "flags of jaxinterp-evaluate-circuit:" in console.stdout
  # Each binary is installed as a command (pyproject's [project.scripts] lists scripts.SCRIPTS).
  assert set(scripts.SCRIPTS) == {f"jaxinterp-{b.replace('_', '-')}" for b in BINARIES}


# --------------------------------------------------------------- items 5, 6, 7, 9: usage errors


@pytest.mark.slow  # a dozen fresh processes; CI runs it with -m slow
def test_usage_errors_are_one_line_and_leave_no_output(tiny, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  held = tmp_path / "held"
  bad_cfg = tmp_path / "bad_cfg"
  bad_cfg.mkdir()
  (bad_cfg / "config.json").write_text(json.dumps(
      {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 3, "num_key_value_heads": 2,
       "num_hidden_layers": 1, "vocab_size": 10, "intermediate_size": 8,
       "max_position_embeddings": 8}))
  graph = tmp_path / "graph.json"
  Graph.from_config(CFG).full().to_json(str(graph))
  nested = tmp_path / "new" / "nested"
  out = str(tmp_path / "out")
  cases = [
      (_cmd("find_circuit", f"--model={tiny[0]}", "--n_examples=0", f"--out={out}"),
       ["--n_examples=0", "at least 1"]),
      (_cmd("find_circuit", f"--model={tiny[0]}", "--top_n=-1", f"--out={out}"), ["--top_n=-1"]),
      (_cmd("find_circuit", "--n_exampels=3"), ["n_exampels", "--help"]),
      (_cmd("find_circuit", "--batch_size=big"), ["--batch_size", "big"]),
      (_cmd("find_circuit", f"--model={tiny[0]}", f"--out={a_file}"),
       ["--out", "not a directory"]),
      (_cmd("find_circuit", f"--model={tmp_path / 'missing'}", f"--out={nested}"),
       ["--model=", "missing"]),
      (_cmd("find_circuit", f"--model={tiny[0]}", f"--out={held}"), [f"PID {os.getpid()}"]),
      (_cmd("evaluate_circuit", f"--graph={graph}", f"--model={tiny[0]}", f"--out={a_file}"),
       ["--out", "not a directory"]),
      (_cmd("activation_patching", f"--model={tiny[0]}", f"--out={a_file}"),
       ["--out", "not a directory"]),
      (_cmd("convert_checkpoint", f"--model={bad_cfg}", f"--out={nested}"),
       ["--model=", "n_heads=3"]),
      (_cmd("convert_checkpoint", f"--model={tiny[0]}", f"--out={a_file}"), ["not a directory"]),
      (_cmd("train_das", "--das_steps=0", f"--out={out}"), ["--das_steps=0"]),
      (_cmd("train_das", f"--out={a_file}"), ["not a directory"]),
      (_cmd("train_toy_model", "--out=jaxinterp/assets/toy"), ["bundled", "--overwrite_bundled"]),
      (_cmd("train_toy_model", "--steps=1", f"--out={a_file}"), ["not a directory"]),
      (_cmd("ground_truth", "--methods=nope", f"--out={out}"), ["--methods=nope", "unknown nope"]),
      (_cmd("view", f"--graph={tmp_path / 'absent.json'}"), ["--graph=", "no such file"]),
  ]
  with files.RunDir(held):  # another run holds --out
    runs = _run_all([c for c, _ in cases])
  for (_, needles), r in zip(cases, runs, strict=True):
    _one_line_error(r, *needles)
  assert not os.path.exists(out) and not os.path.exists(tmp_path / "new")  # nothing left behind
  assert a_file.read_text() == "not a directory" and os.listdir(held) == []
  assert toy.toy_metadata()["n_tokens"] == toy.N_TOKENS  # the bundled model is untouched


# ------------------------------------------------- items 1, 7, 10: a circuit found, then evaluated


@pytest.mark.slow
def test_evaluate_circuit_follows_how_the_circuit_was_found(tiny, tmp_path, capsys):
  found = tmp_path / "found"
  r = _run_all([_cmd("find_circuit", f"--model={tiny[0]}", "--noprepend_bos", "--n_examples=8",
                     "--batch_size=8", "--top_n=10", f"--out={found}")], umask=0o027)[0]
  assert r.returncode == 0, r.stderr[-3000:]
  assert not LOG_LINE.search(r.stderr), r.stderr[-3000:]  # orbax and absl stay quiet
  done = (found / "DONE").read_text().split()
  assert set(done) == {"run.json", "graph.json", "scores.npz", "faithfulness.csv", "circuit.png",
                       "faithfulness.png", "circuit.html"}
  assert set(os.listdir(found)) == set(done) | {"DONE"}  # no lock, temp file or checkpoint left
  for name in done + ["DONE"]:
    assert os.stat(found / name).st_mode & 0o777 == 0o640, name  # 0666 less the umask
    assert os.stat(found / name).st_mtime <= os.stat(found / "DONE").st_mtime
  meta = json.loads((found / "graph.json").read_text())["meta"]
  assert meta["prepend_bos"] is False and meta["n_examples"] == 8

  graph = str(found / "graph.json")
  same, other, forced = (str(tmp_path / x) for x in ("same", "other", "forced"))
  capsys.readouterr()
  # No settings given: model, BOS, examples, seed ... as the meta records them, so the same
  # faithfulness.
  rep = report.evaluate_circuit(report.EvaluateConfig(graph=graph, batch_size=8), same)
  assert not _warnings(capsys.readouterr().err)
  assert rep["settings"]["prepend_bos"] is False and rep["settings"]["n_examples"] == 8
  assert os.path.samefile(rep["settings"]["model"], tiny[0])
  assert rep["faithfulness"] == pytest.approx(meta["faithfulness"], abs=1e-4)
  assert files.is_done(same)
  # Same shape, other weights: refused, naming --force.
  with pytest.raises(inputs.InputError) as refused:
    report.evaluate_circuit(report.EvaluateConfig(graph=graph, model=tiny[1]), other)
  for needle in (f"--model={tiny[1]}", "differ", "--force"):
    assert needle in str(refused.value)
  assert not os.path.exists(other)
  # Forced, with settings that override the meta: one warning line each.
  report.evaluate_circuit(report.EvaluateConfig(graph=graph, model=tiny[1], force=True,
                                                prepend_bos=True, n_examples=4, batch_size=4),
                          forced)
  # (Other weights may not do the task: the task check's own warning is not counted here.)
  warnings = [w for w in _warnings(capsys.readouterr().err) if "does not exceed" not in w]
  assert len(warnings) == 2
  assert "--prepend_bos=True (meta: False)" in warnings[0] and "--n_examples=4 (meta: 8)" in \
      warnings[0]
  assert "--force" in warnings[1]


# ---------------------------------------------------------------- item 2: weights, not spelling


@pytest.mark.slow  # a dozen fresh processes; CI runs it with -m slow
def test_induction_data_depend_on_the_weights_not_on_the_spelling(tmp_path):
  copy = tmp_path / "my_toy"
  shutil.copytree(toy.TOY_MODEL_DIR, copy)
  out = tmp_path / "out"
  r = _run_all([_cmd("find_circuit", f"--model={copy}", "--n_examples=8", "--batch_size=8",
                     "--top_n=10", f"--out={out}")])[0]
  assert r.returncode == 0, r.stderr[-3000:]
  meta = json.loads((out / "graph.json").read_text())["meta"]
  expected = inputs.dataset_hash(toy.induction_task_dataset(8))
  assert meta["data_hash"] == expected
  for spelling in ("toy", "jaxinterp/assets/toy", toy.TOY_MODEL_DIR + "/"):
    m = models.from_pretrained(os.path.join(ROOT, inputs.resolve_model_path(spelling)))
    assert inputs.is_toy_model(m)
    assert inputs.dataset_hash(inputs.load_dataset(m, spelling, "induction", None, 8)) == expected
  other = models.Model(toy.load_toy().cfg, jax.tree.map(lambda x: x * 1.01, toy.load_toy().params))
  assert not inputs.is_toy_model(other)


# ------------------------------------------ items 8, 9: a GQA model with a tokenizer, bad rows


@pytest.mark.skipif(not os.path.isdir(TINYSTORIES),
                    reason="needs ../shared/models/tinystories-656k")
def test_bad_rows_rare_answers_kv_heads_and_token_labels(tmp_path, capsys):
  csv = tmp_path / "names.csv"
  ok = "Tom and Sue went to the park. {} gave the ball to"
  csv.write_text("clean,corrupted,correct_idx,incorrect_idx\n"
                 f"{ok.format('Tom')},{ok.format('Sue')},1066,380\n"
                 f"{ok.format('Sue')},{ok.format('Tom')},380,1066\n"
                 f"{ok.format('Tom')},,1066,380\n")
  config = pipeline.PatchingConfig(model=TINYSTORIES, task="logit-diff", data=str(csv),
                                   n_examples=4, batch_size=4)
  with pytest.raises(inputs.InputError) as bad:
    pipeline.activation_patching(config, str(tmp_path / "bad"))
  for needle in ("names.csv", "1 of 3 rows", "line 4", "an empty prompt",
                 "--skip_bad_rows"):
    assert needle in str(bad.value)
  assert not (tmp_path / "bad").exists()
  capsys.readouterr()
  config = dataclasses.replace(config, skip_bad_rows=True, sweeps="resid_pre,head_k")
  pipeline.activation_patching(config, str(tmp_path / "ok"))
  warnings = _warnings(capsys.readouterr().err)
  assert len(warnings) == 2
  assert "left out" in warnings[0] and "line 4" in warnings[0]
  assert "2 of 2 answers are in no prompt's top-50" in warnings[1]
  assert "'Sue' (id 1066)" in warnings[1]
  rep = json.loads((tmp_path / "ok" / "patching.json").read_text())
  assert rep["n_examples"] == 2
  assert rep["sweeps"]["head_k"]["axes"] == ["layer", "kv_head"]
  assert rep["sweeps"]["head_k"]["shape"] == [2, 4]  # 4 key/value heads, not 8 query heads
  assert rep["positions"][3].startswith("3:Sue") and rep["positions"][5].startswith("5:. Tom")
  assert files.is_done(tmp_path / "ok")


# --------------------------------------------------------------------- the library behind them


def test_run_dir_lock_done_marker_and_cleanup(tmp_path):
  out = tmp_path / "a" / "b"
  with pytest.raises(RuntimeError):
    with files.RunDir(out):
      raise RuntimeError("failed before writing anything")
  assert not (tmp_path / "a").exists()  # the directories it created are gone

  with files.RunDir(out) as held:
    with pytest.raises(files.OutputDirError, match=f"PID {os.getpid()}"):
      files.RunDir(out).acquire()
    with held.writing(["x.txt"]):
      files.atomic_write_text(out / "x.txt", "1")
  assert files.is_done(out) and (out / "DONE").read_text() == "x.txt\n"
  assert sorted(os.listdir(out)) == ["DONE", "x.txt"]

  # Killed while writing: DONE was removed first, so the directory shows as unfinished...
  with pytest.raises(KeyboardInterrupt):
    with files.RunDir(out) as held, held.writing(["x.txt", "y.txt"]):
      files.atomic_write_text(out / "x.txt", "2")
      raise KeyboardInterrupt
  assert not files.is_done(out) and out.exists()
  # ... and a rerun completes it.
  with files.RunDir(out) as held, held.writing(["x.txt", "y.txt"]):
    for name in ("x.txt", "y.txt"):
      files.atomic_write_text(out / name, "3")
  assert files.is_done(out)
  with pytest.raises(files.OutputDirError, match="not a directory"):
    files.RunDir(out / "x.txt").acquire()


def test_outputs_get_the_umasks_mode(tmp_path):
  old = os.umask(0o022)
  try:
    files.atomic_write_text(tmp_path / "a.json", "{}")
    os.umask(0o002)
    files.atomic_write_text(tmp_path / "b.json", "{}")
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / "b.json").st_mode & 0o777 == 0o664


def test_csv_names_every_bad_row_and_skips_them_on_request(tmp_path):
  from tokenizers import Tokenizer, pre_tokenizers
  from tokenizers import models as tm
  tok = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(
      ["<unk>", "<bos>", "a", "b", "c", "d"])}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  rows = ["clean,corrupted,correct_idx,incorrect_idx"] + ["a b,c d,2,3"] * 3
  rows += ["a b c,,2,3"] * 25 + ["a b,c d,x,3"]
  path = tmp_path / "t.csv"
  path.write_text("\n".join(rows) + "\n")
  with pytest.raises(tasks.TaskError) as e:
    tasks.load_task("ioi", path, tok, bos_id=1)
  msg = str(e.value)
  assert "\n" not in msg and "26 of 29 rows cannot be used" in msg
  assert "25 with an empty prompt (lines 5, 6," in msg
  assert "and 5 more" in msg and "1 with a malformed label (line 30)" in msg
  d = tasks.load_task("ioi", path, tok, bos_id=1, skip_bad_rows=True, n_examples=2)
  assert len(d) == 2 and not d.skipped  # the first two rows are good: nothing read is skipped
  d = tasks.load_task("ioi", path, tok, bos_id=1, skip_bad_rows=True)
  assert len(d) == 3 and len(d.skipped) == 26 and "26 of 29 rows" in d.skipped_summary


def _capture(monkeypatch) -> list:
  figs = []
  monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig))
  return figs


def test_plots_read_as_a_reader_expects(monkeypatch):
  figs = _capture(monkeypatch)
  n = np.asarray([0, 1, 2, 5, 10, 20, 110])
  curve = evaluation.FaithfulnessCurve(n_edges=n, n_edges_kept=n, percentages=n / 110.0,
                                       metric=n * 0.1, faithfulness=n / 110.0, m_full=1.0,
                                       m_empty=0.0)
  plots.plot_faithfulness(curve, "unused.png", title="t")
  ax = figs[-1].axes[0]
  figs[-1].canvas.draw()
  assert ax.get_xlim()[0] > -0.5 and ax.get_xlim()[1] > 110
  ticks = [t.get_text() for t in ax.get_xticklabels() if ax.get_xlim()[0] <= t.get_position()[0]]
  assert ticks and not any(t.startswith(("-", "\u2212")) for t in ticks)

  result = patching.PatchingResult(
      sweep=patching.SWEEPS["resid_pre"], direction="noising", metric=np.ones((2, 3)),
      normalized=np.asarray([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]]), m_clean=2.0, m_corrupted=1.0,
      axis_labels=("layer", "position"), n_examples=4)
  plots.plot_patching(result, "unused.png", title="a long task name on a small heatmap",
                      position_labels=["0:<bos>", "1: Tom", "2: gave"])
  fig = figs[-1]
  ax, bar = fig.axes
  im = ax.images[0]
  assert im.norm.vcenter == 1.0  # noising: 1 is no effect, the colour map's white
  np.testing.assert_allclose(np.asarray(im.get_array()), [[1, 1, 0], [1, 0.5, 1]])  # as computed
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0:<bos>", "1: Tom", "2: gave"]
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  title = ax.title.get_window_extent(renderer)
  label = bar.yaxis.label.get_window_extent(renderer)
  assert not title.overlaps(label)
  assert title.x1 <= bar.get_window_extent(renderer).x0  # the title stays over its heatmap


def test_rarely_predicted_answers():
  """An answer set counts as predicted when any of its ids is in some prompt's top-k."""
  m, d = toy.load_toy(), toy.induction_task_dataset(8)

  def check(data):
    return answers.rarely_predicted_answers(m.cfg, m.params, data, k=1)

  assert check(d) == []  # the toy predicts its induction targets
  never = toy.BOS_ID  # BOS is never the next token
  correct = np.asarray(d.labels["correct"])
  as_bos = dataclasses.replace(d, labels={**d.labels, "correct": np.full_like(correct, never)})
  assert check(as_bos) == [(never,)]
  sets = np.stack([np.full_like(correct, never), correct], 1)
  assert check(dataclasses.replace(d, labels={**d.labels, "correct": sets})) == []
