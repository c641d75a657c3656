"""Outputs a researcher can trust (issue 31): the task check before attribution and `--filter`,
run directories that are never overwritten silently, and every setting in the outputs' meta."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxinterp import attribution as A
from jaxinterp import models
from jaxinterp.attribution.base import IGOptions
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.evaluation import report, task_check
from jaxinterp.groundtruth import runner
from jaxinterp.interventions import toy_task
from jaxinterp.runtime import files, inputs
from jaxinterp.viz import page

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINYSTORIES = os.path.join(ROOT, "..", "shared", "models", "tinystories-656k")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  cfg = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                           d_vocab=40, n_ctx=32, bos_token_id=0)
  path = str(tmp_path_factory.mktemp("tiny"))
  models.save_converted(models.Model(cfg, models.init_params(cfg, jax.random.PRNGKey(0))), path)
  return path


def _snapshot(directory) -> dict[str, str]:
  """sha256 of every file under `directory`, by relative path."""
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def _one_line(e) -> str:
  message = str(e.value if hasattr(e, "value") else e)
  assert "\n" not in message, message
  return message


# ---------------------------------------------------------------------------- run directories


def test_run_dir_refuses_other_runs_and_completes_the_same(tmp_path):
  out = tmp_path / "run"
  rec = files.RunRecord("find_circuit", {"method": "EAP", "task": "ioi", "n": 1}, ("method",))
  with files.RunDir(out, rec) as held, held.writing(["x.txt", "old.txt"]):
    for name in ("x.txt", "old.txt"):
      files.atomic_write_text(out / name, "1")
  assert (out / "DONE").read_text().split() == ["run.json", "x.txt", "old.txt"]
  before = _snapshot(out)
  with files.RunDir(out, rec) as held:  # the same run, finished: complete, nothing written
    assert held.complete
  other = dataclasses.replace(rec, settings={"method": "exact", "task": "ioi", "n": 1})
  with pytest.raises(files.OutputDirError) as e:
    files.RunDir(out, other).acquire()
  assert "holds a finished find_circuit run (method=EAP) with other settings (--method: 'EAP' " \
         "there, 'exact' now)" in _one_line(e) and "--overwrite" in str(e.value)
  with pytest.raises(files.OutputDirError, match="another binary, a finished find_circuit run"):
    files.RunDir(out, files.RunRecord("train_das", {})).acquire()
  assert _snapshot(out) == before and not (out / ".lock").exists()
  assert files.owning_run(out / "x.txt") == "find_circuit run (method=EAP)"
  assert files.owning_run(out / "y.txt") is None

  # --overwrite: the old run's outputs not written again go, the new record replaces the old.
  with files.RunDir(out, other, overwrite=True) as held, held.writing(["x.txt"]):
    files.atomic_write_text(out / "x.txt", "2")
  assert sorted(os.listdir(out)) == ["DONE", "run.json", "x.txt"]
  assert files.read_run_record(out).settings["method"] == "exact"
  # Unfinished (no DONE): the same binary completes it, another binary is refused.
  os.unlink(out / "DONE")
  with files.RunDir(out, rec) as held:
    assert not held.complete
  with pytest.raises(files.OutputDirError, match="an unfinished find_circuit run"):
    files.RunDir(out, files.RunRecord("train_das", {})).acquire()
  # A finished run without a record (written before run.json existed) is refused too.
  old = tmp_path / "old"
  with files.RunDir(old) as held, held.writing(["x.txt"]):
    files.atomic_write_text(old / "x.txt", "1")
  with pytest.raises(files.OutputDirError, match="settings are not recorded"):
    files.RunDir(old, rec).acquire()


def _run(binary, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAXINTERP_COMPILATION_CACHE="")
  return subprocess.run([sys.executable, "-m", f"experiments.{binary}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # four binaries over one finished run (about 10 s)
def test_out_is_never_overwritten_silently(tiny_model, tmp_path, capsys):
  """find_circuit over a finished run: the same settings complete, others refused (one line, exit
  2, files byte-identical) unless --overwrite; evaluate_circuit, view and train_das never replace
  its files."""
  out = str(tmp_path / "found")
  config = FindCircuitConfig(model=tiny_model, method="EAP", n_examples=8, batch_size=4,
                             top_n=10, bootstrap=2)
  find_circuit(config, out)
  meta = json.load(open(os.path.join(out, "graph.json")))["meta"]
  assert meta["bootstrap"]["resamples"] == 2  # every setting in meta
  before = _snapshot(out)
  args = [f"--model={tiny_model}", "--method=EAP", "--n_examples=8", "--batch_size=4",
          "--top_n=10", "--bootstrap=2", f"--out={out}"]
  same = _run("find_circuit", *args)
  assert same.returncode == 0 and "already holds this find_circuit run" in same.stdout, same.stderr
  other = _run("find_circuit", *args, "--method=EAP-IG-inputs")
  lines = other.stderr.strip().splitlines()
  assert other.returncode == 2 and len(lines) == 1, other.stderr
  assert "finished find_circuit run (method=EAP, " in lines[0] and "--method: 'EAP' there, " \
         "'EAP-IG-inputs' now" in lines[0] and "--overwrite" in lines[0]
  assert _snapshot(out) == before

  graph = os.path.join(out, "graph.json")
  with pytest.raises(inputs.InputError) as e:  # the graph's own run is another binary's
    report.evaluate_circuit(report.EvaluateConfig(graph=graph), out)
  assert "another binary, a finished find_circuit run" in _one_line(e)
  with pytest.raises(inputs.InputError, match="another binary"):
    toy_task.train_das(toy_task.DASConfig(), out)
  with pytest.raises(inputs.InputError) as e:
    page.write_page(page.ViewConfig(graph=graph, out=os.path.join(out, "circuit.html")))
  assert "is an output of the find_circuit run (method=EAP" in _one_line(e)
  assert _snapshot(out) == before
  # Beside the graph: evaluation/ and view.html, the run's files untouched.
  summary = report.evaluate_circuit(report.EvaluateConfig(graph=graph, batch_size=4))
  assert files.is_done(os.path.join(out, "evaluation")) and "task_check" in summary
  assert page.write_page(page.ViewConfig(graph=graph)) == os.path.join(out, "view.html")
  assert {k: v for k, v in _snapshot(out).items() if k in before} == before

  capsys.readouterr()
  find_circuit(dataclasses.replace(config, method="EAP-IG-inputs"), out, overwrite=True)
  meta = json.load(open(graph))["meta"]
  assert meta["method"] == "EAP-IG-inputs" and meta["ig_steps"] == 5


# --------------------------------------------------------------------------- every setting


def test_meta_holds_each_methods_own_options_whole():
  for name, method in A.METHODS.items():
    values = method.option_values(method.make_options())
    fields = {f.name for f in dataclasses.fields(method.options)} - {"progress"}
    assert set(values) == fields, name
    assert ("ig_steps" in values) == issubclass(method.options, IGOptions), name
  assert "tau" in A.METHODS["ACDC"].option_values(A.METHODS["ACDC"].make_options())
  ep = A.METHODS["edge-pruning"].option_values(A.METHODS["edge-pruning"].make_options())
  assert {"mask_steps", "mask_lr", "sparsity"} <= set(ep)
  assert "mask_steps" in A.METHODS["UGS"].option_values(A.METHODS["UGS"].make_options())


@pytest.mark.slow
def test_ground_truth_and_train_das_record_their_config(tmp_path):
  config = runner.GroundTruthConfig(methods="EAP", interventions="patching", builtin="toy",
                                    n_examples=64)
  doc = runner.ground_truth(config, str(tmp_path / "gt"))
  assert doc["config"] == dataclasses.asdict(config)
  meta = json.load(open(tmp_path / "gt" / "toy" / "EAP" / "graph.json"))["meta"]
  assert meta["config"] == dataclasses.asdict(config)
  das = toy_task.DASConfig(model_dir=str(tmp_path / "m"), model_steps=50, das_steps=5,
                           n_train=64, n_eval=64)
  result = toy_task.train_das(das, str(tmp_path / "das"))
  assert json.load(open(tmp_path / "das" / "iia.json"))["config"] == dataclasses.asdict(das)
  assert result["config"] == dataclasses.asdict(das)


# ---------------------------------------------------------------------------------- task check


def test_answer_hits_per_label_layout():
  top = np.array([5, 7, 9])
  assert task_check.answer_hits({"target": np.array([5, 1, 9])}, top).tolist() == \
      [True, False, True]
  assert task_check.answer_hits({"correct": np.array([5, 7, 0])}, top).tolist() == \
      [True, True, False]
  sets = np.array([[1, 5, -1], [2, 3, 4], [9, -1, -1]])  # sva, hypernymy: any of a set
  assert task_check.answer_hits({"correct": sets}, top).tolist() == [True, False, True]
  years = np.tile(np.arange(100, 200)[None], (3, 1))  # greater-than: a year above YY
  hits = task_check.answer_hits({"year_ids": years, "threshold": np.array([10, 10, 50])},
                                np.array([111, 105, 150]))
  assert hits.tolist() == [True, False, False]
  loss = task_check.TaskCheck("t", "kl", False, np.array([0.1, 0.5]), np.array([0.3, 0.2]), None)
  assert loss.right.tolist() == [True, False]  # a loss: lower is right


def test_bundled_model_does_its_task_without_a_warning(tmp_path, capsys):
  summary = find_circuit(FindCircuitConfig(method="EAP", n_examples=16), str(tmp_path / "toy"))
  captured = capsys.readouterr()
  assert "warning" not in captured.err
  assert "task check (" in captured.out and "clean answer top-1 in 100%" in captured.out
  checked = summary["task_check"]
  assert checked["does_task"] and checked["clean_beats_corrupted"] == 1.0
  assert checked["top1_accuracy"] == 1.0 and checked["clean_mean"] > checked["corrupted_mean"]


def _ioi_csv(path, trailing: str) -> int:
  """The issue's IOI template for TinyStories' tokenizer, names swapped in the corrupted prompt."""
  tok = Tokenizer.from_file(os.path.join(TINYSTORIES, "tokenizer.json"))
  ids = {}
  for n in ("Tom", "Sue", "Lily", "Ben", "Max", "Anna", "Tim", "Sam", "Mia", "Bob"):
    e = tok.encode(f"to {n}", add_special_tokens=False)
    if e.tokens[-1] == n:
      ids[n] = e.ids[-1]
  rows = []
  for a, b in itertools.permutations(ids, 2):
    clean = f"{a} and {b} went to the park. {b} gave a ball to{trailing}"
    corrupted = f"{a} and {b} went to the park. {a} gave a ball to{trailing}"
    if len(tok.encode(clean).ids) == len(tok.encode(corrupted).ids):  # aligned for patching
      rows.append([clean, corrupted, ids[a], ids[b]])
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([["clean", "corrupted", "correct_idx", "incorrect_idx"]] + rows)
  return len(rows)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TINYSTORIES),
                    reason="needs ../shared/models/tinystories-656k")
def test_a_model_that_does_not_do_the_task_is_named_and_filtered(tmp_path, capsys):
  data = tmp_path / "ioi.csv"
  n = _ioi_csv(data, " ")
  config = FindCircuitConfig(model=TINYSTORIES, task="ioi", data=str(data), n_examples=n,
                             method="EAP", batch_size=32)
  capsys.readouterr()
  summary = find_circuit(config, str(tmp_path / "all"))
  err = capsys.readouterr().err
  warned = [line for line in err.splitlines() if "does not exceed the corrupted" in line]
  assert len(warned) == 1 and "the model does not do this task" in warned[0]
  checked = summary["task_check"]
  assert f"({checked['clean_mean']:.4f})" in warned[0] and checked["clean_mean"] < 0
  assert checked["clean_beats_corrupted"] < 0.1 and checked["top1_accuracy"] < 0.1
  # Without the trailing space some rows are right: --filter=correct keeps exactly those.
  n = _ioi_csv(data, "")
  config = dataclasses.replace(config, n_examples=n, filter="correct")
  out = str(tmp_path / "right")
  summary = find_circuit(config, out)
  printed = capsys.readouterr()
  checked = summary["task_check"]
  assert 0 < checked["n_kept"] == checked["n_right"] < n and checked["n_rows"] == n
  assert f"kept the {checked['n_kept']} of {n} rows" in printed.out
  assert "does not exceed the corrupted" not in printed.err
  meta = json.load(open(os.path.join(out, "graph.json")))["meta"]
  assert meta["n_examples"] == checked["n_kept"] and meta["filter"] == "correct"
  # evaluate_circuit filters the same rows: the data hash matches the meta's, no warning.
  rep = report.evaluate_circuit(report.EvaluateConfig(graph=os.path.join(out, "graph.json")))
  assert rep["task_check"]["n_kept"] == checked["n_kept"] and rep["n_examples"] == \
      checked["n_kept"]
  err = capsys.readouterr().err
  assert "examples differ" not in err and "does not exceed" not in err
