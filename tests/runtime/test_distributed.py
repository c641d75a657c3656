"""Multi-process runs (jax.distributed, gloo on CPU): 2 processes x 2 simulated CPU devices give
what one process gives (find_circuit's scores and curve, evaluate_circuit's report: both split the
batches over the processes; the task check, mean ablation's means, activation patching and optimal
ablation's training), a killed peer ends the other with one line, and a checkpoint of a 2-process
run resumes on 1 process.

The binaries run as subprocesses on localhost (XLA_FLAGS must be set before jax starts). They share
one compilation cache in a temporary directory, so only the first run compiles.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxinterp.attribution.progress import Progress, merge_processes

REPO = pathlib.Path(__file__).resolve().parents[2]
# 6 batches: 3 rounds of one batch per process.
RUN = ["--n_examples=24", "--batch_size=4", "--checkpoint_batches=0"]
ERROR = "find_circuit: error: "


def _env() -> dict:
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(out, cache, *extra, **kw) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "experiments.find_circuit", f"--out={out}",
         f"--compilation_cache={cache}", *RUN, *extra]
  return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _processes(out, cache, timeout=60, *extra) -> list[subprocess.Popen]:
  common = [f"--coordinator_address=localhost:{_port()}", "--num_processes=2",
            f"--distributed_timeout={timeout}", *extra]
  return [_start(out, cache, *common, f"--process_id={p}") for p in (0, 1)]


def _finish(p: subprocess.Popen, timeout=240) -> tuple[int, str, str]:
  out, err = p.communicate(timeout=timeout)
  return p.returncode, out, err


def _errors(err: str) -> list[str]:
  """stderr's lines, without the progress bars (a bar left open precedes an error on its line)."""
  lines = [ln[ln.index(ERROR):] if ERROR in ln else ln
           for ln in err.replace("\r", "\n").splitlines()]
  return [ln for ln in lines if ln.strip() and not ln.startswith(("EAP-IG", "evaluating"))]


def _assert_same_run(a, b) -> None:
  """Scores, circuit and curve of two find_circuit outputs equal to 1e-6."""
  sa, sb = np.load(a / "scores.npz"), np.load(b / "scores.npz")
  assert np.abs(sa["scores"]).max() > 1e-2
  for k in ("scores", "node_scores"):
    np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-6)
  for k in ("in_graph", "nodes_in_graph", "valid"):
    np.testing.assert_array_equal(sb[k], sa[k])
  ca, cb = ((x / "faithfulness.csv").read_text().splitlines() for x in (a, b))
  assert ca[0] == cb[0] and len(ca) == len(cb) > 2
  np.testing.assert_allclose(np.loadtxt(cb[1:], delimiter=","), np.loadtxt(ca[1:], delimiter=","),
                             rtol=0, atol=1e-6)
  ga, gb = (json.loads((x / "graph.json").read_text()) for x in (a, b))
  assert {k: v for k, v in ga.items() if k != "meta"} == {k: v for k, v in gb.items()
                                                          if k != "meta"}
  for k in ("faithfulness", "m_full", "m_empty", "clean_metric"):
    assert abs(ga["meta"][k] - gb["meta"][k]) <= 1e-6, k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process's run (it fills the shared compilation cache)."""
  root = tmp_path_factory.mktemp("distributed")
  cache = root / "cache"
  rc, out, err = _finish(_start(root / "one", cache))
  assert rc == 0, out[-2000:] + err[-3000:]
  return root, cache


@pytest.mark.slow  # five find_circuit processes (~25 s wall, ~45 s CPU): the fast suite's budget
def test_two_processes_equal_one_and_a_killed_peer_ends_the_other(reference):
  root, cache = reference
  # Two runs at once: a whole one, and one whose process 1 is killed after the first round.
  whole = _processes(root / "two", cache)
  killed = _processes(root / "killed", cache, 40)
  step = root / "killed" / ".resume" / "step_000002"  # process 0's checkpoint after round 1
  deadline = time.monotonic() + 240
  while not step.exists() and killed[0].poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  os.kill(killed[1].pid, signal.SIGKILL)
  t0 = time.monotonic()
  rc, _, err = _finish(killed[0], timeout=120)
  waited = time.monotonic() - t0
  killed[1].communicate()
  lines = _errors(err)
  assert step.exists(), err[-3000:]
  assert rc == 1 and len(lines) == 1 and lines[0].startswith(ERROR), err[-3000:]
  assert "process 0" in lines[0] and waited < 100, (lines, waited)

  outs = []
  for p in whole:
    rc, out, err = _finish(p)
    assert rc == 0, out[-2000:] + err[-3000:]
    outs.append(out)
  # The report is printed once, by process 0 (gloo's own connection lines remain on both).
  assert "phases:" in outs[0] and "phases:" not in outs[1] and "wrote " not in outs[1]
  _assert_same_run(root / "one", root / "two")
  assert not (root / "two" / ".resume").exists()  # process 0 cleared its checkpoints

  # The 2-process checkpoint resumes on 1 process, to the same result.
  rc, out, err = _finish(_start(root / "killed", cache))
  assert rc == 0 and "resuming from checkpoint: batch 2 of 6" in out, out[-2000:] + err[-3000:]
  _assert_same_run(root / "one", root / "killed")


def test_unreachable_coordinator_is_one_line(tmp_path):
  t0 = time.monotonic()
  p = _start(tmp_path / "out", "", f"--coordinator_address=localhost:{_port()}",
             "--num_processes=2", "--process_id=1", "--distributed_timeout=2")
  rc, _, err = _finish(p, timeout=60)
  assert rc == 2 and _errors(err) == [line for line in _errors(err) if line.startswith(ERROR)]
  assert len(_errors(err)) == 1 and "cannot reach the coordinator" in err, err[-2000:]
  assert time.monotonic() - t0 < 30
  assert not (tmp_path / "out").exists()


def test_bad_process_settings_are_refused_before_jax_starts():
  from jaxinterp.runtime import distributed
  assert not distributed.requested(None, None, None) or "SLURM_NTASKS" in os.environ
  for kw, match in (({"num_processes": 2, "process_id": 2}, "--process_id=2"),
                    ({"num_processes": 0}, "--num_processes"),
                    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0},
                     "HOST:PORT"),
                    ({"num_processes": 2, "process_id": 0, "timeout": 0}, "--distributed_timeout")):
    with pytest.raises(distributed.DistributedError, match=match):
      distributed.initialize(**kw)
  assert not distributed.is_distributed() and distributed.process_count() == 1


def test_one_process_merge_is_the_sequential_merge():
  a = Progress.of_batch(np.arange(6.0).reshape(2, 3), 1.5, 4, keep_batches=True)
  b = Progress.of_batch(np.full((2, 3), 0.25), -0.5, 3, keep_batches=True)
  merged = merge_processes(a, b)
  want = a.merge(b)
  np.testing.assert_array_equal(merged.score_sum, want.score_sum)
  assert (merged.next_batch, merged.clean_sum, merged.seen, merged.batch_counts) == \
      (want.next_batch, want.clean_sum, want.seen, want.batch_counts)
  back = Progress.from_arrays(want.to_arrays())
  np.testing.assert_array_equal(np.stack(back.batch_sums), np.stack(want.batch_sums))
  assert merge_processes(a, None) is a


def _evaluate(graph, out, cache, *extra) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "experiments.evaluate_circuit", f"--graph={graph}", f"--out={out}",
         f"--compilation_cache={cache}", "--batch_size=4", *extra]  # 6 batches: 3 rounds
  return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _assert_same_report(a, b) -> None:
  """evaluate_circuit's numbers and curve in two output directories equal to 1e-6."""
  ea, eb = (json.loads((x / "evaluation.json").read_text()) for x in (a, b))
  assert abs(ea["faithfulness"]) > 1e-2 and ea["n_edges"] == eb["n_edges"] > 0
  for k in ("faithfulness", "metric_circuit", "metric_full", "metric_empty", "CPR", "CMD"):
    assert abs(ea[k] - eb[k]) <= 1e-6, (k, ea[k], eb[k])
  ca, cb = ((x / "faithfulness.csv").read_text().splitlines() for x in (a, b))
  assert ca[0] == cb[0] and len(ca) == len(cb) > 2
  np.testing.assert_allclose(np.loadtxt(cb[1:], delimiter=","), np.loadtxt(ca[1:], delimiter=","),
                             rtol=0, atol=1e-6)


@pytest.mark.slow  # 3 more processes (~35 s); the find_circuit test above covers the split curve
@pytest.mark.by_hand  # CI's 30 minutes
def test_evaluate_circuit_on_two_processes_equals_one(reference):
  root, cache = reference
  graph = root / "one" / "graph.json"
  before = sorted(p.name for p in root.iterdir())
  common = [f"--coordinator_address=localhost:{_port()}", "--num_processes=2",
            "--distributed_timeout=60"]
  runs = [_evaluate(graph, root / "eval_one", cache)] + [
      _evaluate(graph, root / "eval_two", cache, *common, f"--process_id={p}") for p in (0, 1)]
  results = [_finish(p) for p in runs]
  for rc, out, err in results:
    assert rc == 0, out[-2000:] + err[-3000:]
  one, two = root / "eval_one", root / "eval_two"
  _assert_same_report(one, two)
  # One report, written and printed by process 0; no other directory (e.g. one/evaluation).
  assert sorted(os.listdir(two)) == sorted(os.listdir(one)) and (two / "DONE").exists()
  assert sorted(p.name for p in root.iterdir()) == sorted([*before, "eval_one", "eval_two"])
  assert not (root / "one" / "evaluation").exists()
  assert "wrote " in results[1][1] and "faithfulness" in results[1][1]
  assert "wrote " not in results[2][1] and "faithfulness" not in results[2][1]


@pytest.mark.slow
@pytest.mark.by_hand  # a position-level find_circuit, then two evaluations: about 2.5 minutes
def test_position_circuit_evaluation_on_two_processes_equals_one(reference):
  root, cache = reference
  rc, out, err = _finish(_start(root / "pos", cache, "--level=position"))
  assert rc == 0, out[-2000:] + err[-3000:]
  common = [f"--coordinator_address=localhost:{_port()}", "--num_processes=2",
            "--distributed_timeout=120"]
  graph = root / "pos" / "graph.json"
  runs = [_evaluate(graph, root / "pos_one", cache)] + [
      _evaluate(graph, root / "pos_two", cache, *common, f"--process_id={p}") for p in (0, 1)]
  for p in runs:
    rc, out, err = _finish(p)
    assert rc == 0, out[-2000:] + err[-3000:]
  _assert_same_report(root / "pos_one", root / "pos_two")


def test_one_process_split_sum_is_the_sequential_sum():
  from jaxinterp.runtime import distributed
  parts = np.random.default_rng(0).normal(size=(7, 3)) * 10.0 ** np.arange(-8, 13, 3)[:, None]
  seen = []

  def fn(i, item):
    seen.append(i)
    return parts[item]

  got = distributed.sum_split(range(7), fn, np.zeros(3))
  want = np.zeros(3)
  for row in parts:
    want += row
  np.testing.assert_array_equal(got, want)
  assert seen == list(range(7)) and distributed.n_owned(7) == 7


# train_das: 9 DAS sites + the illusion diagnostic, 5 items per process; a toy model trained first
# (by process 0 alone in the 2-process run) in a directory of its own.
DAS = ["--p=5", "--model_steps=150", "--das_steps=15", "--n_train=256", "--n_eval=128", "--k=4"]


def _train_das(out, cache, *extra) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "experiments.train_das", f"--out={out}", f"--model_dir={out}_model",
         f"--compilation_cache={cache}", *DAS, *extra]
  return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.by_hand  # 3 processes, each training a toy model or DAS (~3 min on 2 cores)
def test_train_das_on_two_processes_equals_one(tmp_path):
  from jaxinterp.interventions.saving import load_interventions
  cache = tmp_path / "cache"
  rc, out, err = _finish(_train_das(tmp_path / "one", cache))  # fills the compilation cache
  assert rc == 0, out[-2000:] + err[-3000:]
  common = [f"--coordinator_address=localhost:{_port()}", "--num_processes=2",
            "--distributed_timeout=120"]
  procs = [_train_das(tmp_path / "two", cache, *common, f"--process_id={p}") for p in (0, 1)]
  results = [_finish(p) for p in procs]
  for rc, out, err in results:
    assert rc == 0, out[-2000:] + err[-3000:]
  one, two = tmp_path / "one", tmp_path / "two"
  ja, jb = (json.loads((x / "iia.json").read_text()) for x in (one, two))
  ja.pop("seconds"), jb.pop("seconds"), ja.pop("config"), jb.pop("config")
  assert ja == jb and len({v for row in ja["iia"] for v in row}) > 1, (ja, jb)
  assert abs(ja["illusion"]["effect_full"]) > 1e-2 and ja["model_accuracy"] > 1 / 5
  assert (one / "iia.csv").read_text() == (two / "iia.csv").read_text()
  assert sorted(os.listdir(one)) == sorted(os.listdir(two)) and (two / "DONE").exists()
  assert sorted(os.listdir(tmp_path)) == ["cache", "one", "one_model", "two", "two_model"]
  for name in (n for n in os.listdir(one) if n.startswith("das_") and (one / n).is_dir()):
    (ia, ma), (ib, mb) = (load_interventions(str(x / name)) for x in (one, two))
    assert ma == mb and list(ia) == list(ib)
    for site in ia:
      np.testing.assert_array_equal(np.asarray(ib[site].rotation), np.asarray(ia[site].rotation))
  # One report, printed by process 0 (its stdout carries every site's line).
  assert "illusion diagnostic" in results[0][1] and results[0][1].count(": IIA ") == 9
  assert "IIA" not in results[1][1]


# attribution_graph on the bundled toy_mlp and its transcoders: 14 batches of 16 rows (every
# feature), and the ranking loop (--max_feature_nodes) in rounds of 4 batches of 8 rows.
GRAPH_RUNS = {"all": ["--batch_size=16"], "ranked": ["--batch_size=8", "--max_feature_nodes=50"]}


def _attribution_graph(out, cache, *extra) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "experiments.attribution_graph", f"--out={out}",
         f"--compilation_cache={cache}", *extra]
  return subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # 6 processes of attribution_graph (~40 s)
@pytest.mark.by_hand  # CI's 30 minutes
def test_attribution_graph_on_two_processes_equals_one(tmp_path):
  cache = tmp_path / "cache"
  for name, flags in GRAPH_RUNS.items():
    one, two = tmp_path / f"{name}_one", tmp_path / f"{name}_two"
    rc, out, err = _finish(_attribution_graph(one, cache, *flags))  # fills the cache
    assert rc == 0, out[-2000:] + err[-3000:]
    common = [f"--coordinator_address=localhost:{_port()}", "--num_processes=2",
              "--distributed_timeout=120", *flags]
    procs = [_attribution_graph(two, cache, *common, f"--process_id={p}") for p in (0, 1)]
    results = [_finish(p) for p in procs]
    for rc, out, err in results:
      assert rc == 0, out[-2000:] + err[-3000:]
    # The rows are split and gathered exactly: the same bytes as one process's.
    ga, gb = np.load(one / "graph.npz"), np.load(two / "graph.npz")
    assert sorted(ga.files) == sorted(gb.files) and np.abs(ga["adjacency"]).max() > 1e-2
    for k in ga.files:
      assert ga[k].dtype == gb[k].dtype and ga[k].tobytes() == gb[k].tobytes(), k
    assert (one / "graph.json").read_bytes() == (two / "graph.json").read_bytes()
    assert sorted(os.listdir(one)) == sorted(os.listdir(two)) and (two / "DONE").exists()
    # Process 0 alone writes, prints the report and shows the bar.
    assert "wrote " in results[0][1] and "attribute [" in results[0][2]
    assert "wrote " not in results[1][1] and "attribute [" not in results[1][2]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["cache", *(f"{n}_{k}" for n in GRAPH_RUNS for k in ("one", "two"))])


def test_one_process_map_split_is_the_plain_loop():
  from jaxinterp.runtime import distributed
  seen = []

  def fn(i, item):
    return {"x": np.full(2, item / 4), "i": np.asarray(i)}

  got = distributed.map_split([3, 1, 4], fn, lambda i, r: seen.append((i, int(r["i"]))))
  assert seen == [(0, 0), (1, 1), (2, 2)] and [float(r["x"][0]) for r in got] == [0.75, 0.25, 1.0]
  assert distributed.map_split([], fn) == []


def test_one_process_fold_split_and_allreduce_are_the_plain_loop():
  from jaxinterp.runtime import distributed
  parts = [{"s": np.full(2, x, np.float32)} for x in (0.1, 0.2, 0.3)]
  got = distributed.fold_split(range(3), lambda i, item: parts[item],
                               lambda acc, r: r["s"] if acc is None else acc + r["s"], None)
  np.testing.assert_array_equal(got, (parts[0]["s"] + parts[1]["s"]) + parts[2]["s"])
  assert distributed.fold_split([], lambda i, item: {}, lambda acc, r: acc + 1, 7) == 7
  summed = distributed.allreduce_sum({"g": np.float32([1.5, -2.0]), "n": np.int32(3)})
  assert summed["g"].dtype == np.float64 and summed["g"].tolist() == [1.5, -2.0]
  assert summed["n"] == 3


# The whole-dataset passes before and beside attribution, called as library functions by one
# process and by two (`python -c`): the task check, mean and mean-positional ablation values,
# an activation-patching sweep and optimal ablation's training. 23 rows in batches of 5: the
# processes own 3 and 2 batches, and the last, partial batch (3 rows) leaves process 1 only filler
# rows in optimal ablation's 5th step (each step's 5 rows split 3 + 2).
PASSES = """
import sys
import numpy as np
from jaxinterp.runtime import compilation_cache, distributed
out, cache, with_oa, n = sys.argv[1], sys.argv[2], sys.argv[3] == "oa", int(sys.argv[4])
if n > 1:
  distributed.initialize(sys.argv[5], n, int(sys.argv[6]), timeout=60)
compilation_cache.enable(cache)
from jaxinterp.attribution import ablation, optimal
from jaxinterp.evaluation import task_check
from jaxinterp.groundtruth import toy
from jaxinterp.patching import sweeps
model = toy.load_toy()
cfg, params, ds = model.cfg, model.params, toy.induction_task_dataset(23, seed=1)
check = task_check.check(cfg, params, ds, batch_size=5)
means = np.asarray(ablation.compute_means(cfg, params, ds, 5))
positional = np.asarray(ablation.compute_means(cfg, params, ds, 5, positional=True))
sweep = sweeps.run_sweep(cfg, params, ds, "head_out", batch_size=5, chunk=3, quiet=True)
values, losses = means, np.zeros(0)
if with_oa:
  values, info = optimal.learn_optimal_values(cfg, params, ds, means, optimal.OptimalOptions(
      oa_steps=5, oa_batch=5, oa_patience=0))
  losses = info["losses"]
if distributed.is_writer():
  np.savez(out, clean=check.clean, corrupted=check.corrupted, top1=check.top1, means=means,
           positional=positional,
           sweep=sweep.metric, baselines=[sweep.m_clean, sweep.m_corrupted], values=values,
           losses=losses)
"""


def _passes(out, cache, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", PASSES, str(out), str(cache), *extra],
                          cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("oa", [
    # 3 processes on the toy model (~33 s of CPU): by hand, CI's time budget
    pytest.param("no-oa", marks=[pytest.mark.slow, pytest.mark.by_hand]),
    # Optimal ablation's training too: compiling its step in every process doubles the cost, so
    # CI's time budget leaves it to be run by hand (pyproject.toml's by_hand marker).
    pytest.param("oa", marks=[pytest.mark.slow, pytest.mark.by_hand])])
def test_whole_dataset_passes_on_two_processes_equal_one(tmp_path, oa):
  cache = tmp_path / "cache"
  rc, out, err = _finish(_passes(tmp_path / "one.npz", cache, oa, "1"))  # fills the cache
  assert rc == 0, out[-2000:] + err[-3000:]
  address = f"localhost:{_port()}"
  for p in [_passes(tmp_path / "two.npz", cache, oa, "2", address, str(p)) for p in (0, 1)]:
    rc, out, err = _finish(p)
    assert rc == 0, out[-2000:] + err[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["cache", "one.npz", "two.npz"]  # only process 0 wrote
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  # Sums of the same per-batch values in the same order: bitwise one process's.
  for k in ("clean", "corrupted", "top1", "means", "positional", "sweep", "baselines"):
    assert one[k].dtype == two[k].dtype and one[k].tobytes() == two[k].tobytes(), k
  assert one["top1"].size == 23 and np.abs(one["sweep"] - one["baselines"][1]).max() > 1e-3
  if oa == "oa":  # the gradient sums over the processes, then / the token count: to rounding
    assert np.abs(one["values"] - one["means"]).max() > 1e-3 and one["losses"].size == 5
    np.testing.assert_allclose(two["values"], one["values"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)


METHOD_RUN = """
import json
import sys
import numpy as np
from jaxinterp.runtime import compilation_cache, distributed
out, cache, runs, n = sys.argv[1:5]
if int(n) > 1:
  distributed.initialize(sys.argv[5], int(n), int(sys.argv[6]), timeout=60)
compilation_cache.enable(cache)
from jaxinterp import attribution as A
from jaxinterp.groundtruth import toy
model = toy.load_toy()
ds = toy.induction_task_dataset(23, seed=1)
arrays = {}
for method, options in json.loads(runs):
  res = A.attribute(model.cfg, model.params, ds, method=method, quiet=True, **options)
  named = [("scores", res.scores), ("clean", res.clean_metric), *res.extras.items()]
  arrays.update({f"{method}__{k}": v for k, v in named if isinstance(v, (np.ndarray, int, float))})
if distributed.is_writer():
  np.savez(out, **arrays)
"""

# The fit methods, each splitting its own work over the processes, run one after another in the
# same three processes (one process, then two): ACDC's trials split their batches (23 rows in
# batches of 5: 5 batches, an uneven split); UGS's and Edge Pruning's steps split their 5 rows 3 + 2
# (the second process with a filler row), with per-row mask samples.
FIT_RUNS = [("ACDC", {"acdc_batch": 5, "acdc_metric": "task"}),
            ("UGS", {"mask_steps": 8, "mask_batch": 5, "ugs_samples": 3}),
            ("edge-pruning", {"mask_steps": 8, "mask_batch": 5, "ep_samples": 2, "sparsity": 0.5,
                              "init_logit": 1.0})]


@pytest.mark.slow  # three processes running ACDC, UGS and Edge Pruning on the toy model
def test_fit_methods_on_two_processes_equal_one(tmp_path):
  """ACDC adds its trials' per-batch sums in batch order: one process's scores and circuit,
  bitwise. UGS and Edge Pruning draw every row's mask sample as one process draws it and add the
  gradient sums before the one update: one process's masks and training curves to float32
  rounding (the division by the row count comes after the sum)."""
  cache = tmp_path / "cache"

  def run(out, *extra):
    return subprocess.Popen([sys.executable, "-c", METHOD_RUN, str(out), str(cache),
                             json.dumps(FIT_RUNS), *extra],
                            cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  rc, out, err = _finish(run(tmp_path / "one.npz", "1"))  # fills the cache
  assert rc == 0, out[-2000:] + err[-3000:]
  address = f"localhost:{_port()}"
  for p in [run(tmp_path / "two.npz", "2", address, str(p)) for p in (0, 1)]:
    rc, out, err = _finish(p)
    assert rc == 0, out[-2000:] + err[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["cache", "one.npz", "two.npz"]  # only process 0 wrote
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files)
  acdc = {k.split("__")[1]: one[k] for k in one.files if k.startswith("ACDC__")}
  assert np.abs(acdc["scores"]).max() > 1e-2 and 0 < acdc["circuit"].sum() < acdc["circuit"].size
  for k in one.files:
    method, name = k.split("__")
    if method == "ACDC" or name == "clean":  # per-batch sums added in order: bitwise
      assert one[k].tobytes() == two[k].tobytes(), k
      continue
    if name == "scores":
      assert np.ptp(one[k][one[k] > 0]) > 1e-3  # the masks moved apart
    print(k, np.abs(two[k].astype(np.float64) - one[k]).max())  # the measured differences
    # The raw parameters (theta, log_alpha) move by Adam steps of lr / (1 + eps) even where the
    # gradient is at rounding level: a few 1e-6 after 8 steps at Edge Pruning's lr of 0.8.
    atol = 2e-5 if name in ("theta", "log_alpha") else 1e-6
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=atol, err_msg=k)
