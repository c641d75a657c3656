"""Attribution and evaluation: independent PyTorch cross-check, exact = all-but-e, IG vs EAP,
errors, the method contract over the registry, Progress and its checkpoints."""

import dataclasses
import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import base
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.models.transformer import sender_outputs
from tests.conftest import SHARED

IOI_CSV = SHARED / "data" / "eap-ig" / "ioi" / "gpt2.csv"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"

CFG = models.ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
                         d_vocab=50, n_ctx=32)
PARAMS = models.init_params(CFG, jax.random.PRNGKey(0))
DATA = tasks.make_induction(8, 5, 50, seed=0, bos_id=0)


def _corr(a, b):
  return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------ the independent torch oracle


@pytest.fixture(scope="module")
def torch_setup(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if not (IOI_CSV.exists() and TOKENIZER.exists()):
    pytest.skip("../shared is absent")
  from tests.attribution.torch_oracle import GPT2GraphOracle
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   initializer_range=0.1)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  path = tmp_path_factory.mktemp("gpt2_ioi")
  hf.save_pretrained(str(path))
  model = models.from_pretrained(path)
  data = tasks.load_task("ioi", IOI_CSV, TOKENIZER, n_examples=16, vocab_size=50257)
  return GPT2GraphOracle(hf), model, data


def _torch_inputs(data):
  import torch
  clean = torch.tensor(data.clean, dtype=torch.long)
  corrupted = torch.tensor(data.corrupted, dtype=torch.long)
  mask = torch.tensor(np.arange(data.clean.shape[1])[None] < data.lengths[:, None])
  last = torch.tensor(data.lengths - 1, dtype=torch.long)
  correct = torch.tensor(data.labels["correct"], dtype=torch.long)
  incorrect = torch.tensor(data.labels["incorrect"], dtype=torch.long)
  return clean, corrupted, mask, last, correct, incorrect


@pytest.mark.parametrize("method", ["EAP", pytest.param("EAP-IG-inputs", marks=pytest.mark.slow),
                                    pytest.param("exact", marks=pytest.mark.slow)])
def test_matches_independent_torch_oracle_on_ioi(torch_setup, method):
  oracle, model, data = torch_setup
  args = _torch_inputs(data)
  ref = {"EAP": oracle.eap_scores,
         "EAP-IG-inputs": lambda *a: oracle.eap_ig_inputs_scores(*a, steps=5),
         "exact": oracle.exact_scores}[method](*args)
  own = {"EAP": {}, "EAP-IG-inputs": {"ig_steps": 5}, "exact": {"exact_chunk": 128}}[method]
  ours = A.attribute(model.cfg, model.params, data, method=method, batch_size=8, quiet=True,
                     **own).scores
  valid = valid_edges(model.cfg)
  assert valid.sum() == np.asarray(oracle.valid_edges()).sum()
  r = _corr(ours[valid], ref[valid])
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"{method}: pearson={r:.6f} max rel err={rel:.2e}")
  assert r >= 0.999
  assert rel <= 1e-2


# ------------------------------------------------------------------------------- internal checks


def _families():
  from tests.attribution.test_receiver_grads import CONFIGS, _params
  return {f: (CONFIGS[f], _params(CONFIGS[f], scale=3.0)) for f in ("gpt_neox", "llama", "gemma2")}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
@pytest.mark.slow
def test_exact_scores_equal_evaluating_all_but_e(family):
  """Exact patching (fused-head reruns from the receiver's layer) equals evaluating the graph-form
  forward with that one edge removed, for every family (parallel blocks, GQA, post-norms)."""
  cfg, params = (CFG, PARAMS) if family == "gpt2" else _families()[family]
  data = DATA if family == "gpt2" else tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)
  ex = A.attribute(cfg, params, data, method="exact", batch_size=4, quiet=True)
  g = Graph.from_config(cfg)
  m_full, _ = V.baselines(cfg, params, data, batch_size=4)
  np.testing.assert_allclose(ex.clean_metric, m_full, rtol=1e-5)
  s_idx, r_idx = np.nonzero(g.valid)
  rng = np.random.RandomState(0)
  # Some edges of every receiver kind: q/k/v of heads, MLPs and the logits.
  logits = np.flatnonzero(r_idx == r_idx.max())
  mlp = np.flatnonzero((r_idx % (3 * cfg.n_heads + 1)) == 3 * cfg.n_heads)
  pick = np.concatenate([rng.choice(s_idx.size, 12, replace=False), rng.choice(logits, 2),
                         rng.choice(mlp, 3)])
  weights = []
  for k in pick:
    w = g.full().edge_weights()
    w[s_idx[k], r_idx[k]] = 0
    weights.append(w)
  metric = V.evaluate_circuits(cfg, params, data, np.stack(weights), batch_size=4, chunk=6,
                               quiet=True)
  got, want = ex.scores[s_idx[pick], r_idx[pick]], metric - m_full
  assert np.abs(want).max() > 1e-3  # a real signal
  np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()), rtol=1e-4)


@pytest.mark.parametrize("intervention", ["zero", "mean", "mean-positional"])
@pytest.mark.slow
def test_other_ablations_eap_is_the_derivative_and_exact_is_exact(intervention):
  """EAP = -dm/dw at w = 1 (checked in float64) and exact = m(all but e) - m(full), per ablation."""
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", intervention=intervention, batch_size=8,
                    quiet=True).scores
  ex = A.attribute(CFG, PARAMS, DATA, method="exact", intervention=intervention, batch_size=8,
                   quiet=True).scores
  g = Graph.from_config(CFG)
  s_idx, r_idx = np.nonzero(g.valid)
  pick = np.random.RandomState(1).choice(s_idx.size, 4, replace=False)
  ablation = A.make_ablation(CFG, PARAMS, DATA, intervention, 8)
  weights = []
  for k in pick:
    w = g.full().edge_weights()
    w[s_idx[k], r_idx[k]] = 0
    weights.append(w)
  m_full, _ = V.baselines(CFG, PARAMS, DATA, batch_size=8, ablation=ablation)
  metric = V.evaluate_circuits(CFG, PARAMS, DATA, np.stack(weights), batch_size=8,
                               ablation=ablation,
                               quiet=True)
  np.testing.assert_allclose(ex[s_idx[pick], r_idx[pick]], metric - m_full, atol=2e-5)
  batch = next(DATA.batches(8))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), PARAMS)
    ab64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), ablation)
    ablated = ab64.values(CFG, p64, batch)

    def m(w):
      logits = models.forward(CFG, p64, batch.clean, attention_mask=batch.mask,
                              edges=models.EdgePatch(w, ablated))
      return DATA.task.metric(logits, batch).mean()

    ones = jnp.ones(g.valid.shape, jnp.float64)
    eps = 1e-4
    for k in pick:
      e = ones.at[s_idx[k], r_idx[k]].add(-eps)
      fd = (m(e) - m(ones)) / eps
      np.testing.assert_allclose(eap[s_idx[k], r_idx[k]], fd, rtol=1e-3, atol=1e-6)


def test_mean_ablation_uses_masked_means():
  ds = dataclasses.replace(DATA, lengths=np.full(len(DATA), 6, np.int32))
  means = A.compute_means(CFG, PARAMS, ds, 4)
  senders = sender_outputs(CFG, PARAMS, jnp.asarray(ds.clean))
  np.testing.assert_allclose(means, np.asarray(senders)[:, :6].mean((0, 1)), atol=1e-5)
  pos = A.compute_means(CFG, PARAMS, ds, 4, positional=True)
  np.testing.assert_allclose(pos[:6], np.asarray(senders)[:, :6].mean(0), atol=1e-5)
  np.testing.assert_allclose(pos[6:], 0.0)


@pytest.mark.slow
def test_ig_with_many_steps_is_closer_to_exact_than_eap():
  ex = A.attribute(CFG, PARAMS, DATA, method="exact", batch_size=8, quiet=True).scores
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  ig = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=32, batch_size=8,
                   quiet=True).scores
  v = valid_edges(CFG)

  def err(s):
    return np.abs(s[v] - ex[v]).sum()

  assert err(ig) < err(eap)
  assert _corr(ig[v], ex[v]) > _corr(eap[v], ex[v])


def test_ig_completeness_on_the_input_node():
  """With many steps, the input row of EAP-IG-inputs sums to m(corrupted input) - m(clean)."""
  ig = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=64, batch_size=8,
                   quiet=True, ig_convention="paper")
  m_full, m_empty = V.baselines(CFG, PARAMS, DATA, batch_size=8)
  total = ig.scores[0].sum()
  np.testing.assert_allclose(total, m_empty - m_full, rtol=0.03)


@pytest.mark.slow
def test_ig_conventions_and_clean_corrupted():
  np.testing.assert_allclose(A.ig_alphas(4), [0, 0.25, 0.5, 0.75])
  np.testing.assert_allclose(A.ig_alphas(4, "paper"), [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(A.ig_alphas(2, "eap", eap_start=1), [0.5, 1.0])  # activations
  assert A.IGOptions(ig_steps=2).alphas(eap_start=1).tolist() == [0.5, 1.0]
  with pytest.raises(A.AttributionError, match="eap_start"):
    A.ig_alphas(2, "eap", "EAP-IG-activations")
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  cc = A.attribute(CFG, PARAMS, DATA, method="clean-corrupted", batch_size=8, quiet=True).scores
  ig1 = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=1, batch_size=8,
                    quiet=True, ig_convention="paper").scores
  np.testing.assert_allclose(ig1, eap, atol=1e-6)  # one step at alpha = 1 is EAP
  ig0 = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=1, batch_size=8,
                    quiet=True).scores  # alpha = 0: gradient at the corrupted input
  np.testing.assert_allclose(cc, (eap + ig0) / 2, atol=1e-6)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_ig_activations_runs_and_tracks_exact():
  ex = A.attribute(CFG, PARAMS, DATA, method="exact", batch_size=8, quiet=True).scores
  act = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-activations", ig_steps=8, batch_size=8,
                    quiet=True).scores
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  v = valid_edges(CFG)
  assert _corr(act[v], ex[v]) > 0.9
  assert _corr(act[v], ex[v]) >= _corr(eap[v], ex[v])


def test_node_scores_are_row_sums_and_match_node_ablation_to_first_order():
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  ns = A.node_scores(CFG, eap)
  np.testing.assert_allclose(ns, eap.sum(1), rtol=1e-5, atol=1e-7)
  assert ns.shape == (models.edges.n_senders(CFG),)


@pytest.mark.slow  # the fast suite's budget: the contract test checks batch-size invariance fast
def test_batch_size_does_not_change_scores():
  # Two IG steps, as the contract test's run of EAP-IG-inputs: the same programs, compiled once.
  kw = dict(method="EAP-IG-inputs", ig_steps=2, quiet=True)
  a = A.attribute(CFG, PARAMS, DATA, batch_size=3, **kw).scores
  b = A.attribute(CFG, PARAMS, DATA, batch_size=8, **kw).scores
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_faithfulness_curve_endpoints():
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  g = Graph.from_config(CFG, eap)
  curve = V.faithfulness_curve(CFG, PARAMS, DATA, eap, n_edges=[0, 5, g.n_edges], batch_size=8,
                               quiet=True)
  np.testing.assert_allclose(curve.faithfulness[[0, -1]], [0.0, 1.0], atol=1e-5)
  assert curve.n_edges_kept[-1] == g.n_edges
  scores = V.mib_scores(CFG, PARAMS, DATA, eap, batch_size=8)
  assert set(scores) == {"CPR", "CMD"} and all(np.isfinite(list(scores.values())))


def test_errors_are_clear():
  with pytest.raises(A.AttributionError, match="unknown method"):
    A.attribute(CFG, PARAMS, DATA, method="not-a-method")
  with pytest.raises(A.AttributionError, match="unknown intervention"):
    A.attribute(CFG, PARAMS, DATA, method="EAP", intervention="resample")
  with pytest.raises(A.AttributionError, match="ig_steps"):
    A.attribute(CFG, PARAMS, DATA, ig_steps=0)
  nan_params = jax.tree.map(lambda x: x, PARAMS)
  nan_params["blocks_1"]["mlp"]["b_out"] = jnp.full((32,), jnp.nan)
  with pytest.raises(A.AttributionError, match="NaN/inf in batch 0"):
    A.attribute(CFG, nan_params, DATA, method="EAP", batch_size=4, quiet=True)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_kl_and_cross_entropy_metrics():
  kl_data = dataclasses.replace(DATA, task=tasks.with_metric(DATA.task, "kl"))
  res = A.attribute(CFG, PARAMS, kl_data, method="EAP-IG-inputs", batch_size=8, quiet=True)
  assert abs(res.clean_metric) < 1e-6  # KL of the clean run to itself
  m_full, m_empty = V.baselines(CFG, PARAMS, kl_data, batch_size=8)
  assert m_full == pytest.approx(0.0, abs=1e-6) and m_empty > 0
  ce_data = dataclasses.replace(DATA, task=tasks.with_metric(DATA.task, "cross-entropy"))
  ce = A.attribute(CFG, PARAMS, ce_data, method="EAP", batch_size=8, quiet=True)
  lp = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True)  # log p(target)
  np.testing.assert_allclose(ce.scores, -lp.scores, atol=1e-6)
  with pytest.raises(tasks.TaskError, match="unknown metric"):
    tasks.with_metric(DATA.task, "accuracy")


# ------------------------------------------------------------- the contract every method keeps


SMALL_OPTIONS = dict(ig_steps=2, mask_steps=4, mask_batch=4, ugs_samples=2, acdc_metric="task")


# EAP-IG-activations', UGS's and exact's contract runs are the slowest; they run with -m slow.
# test_ig_activations_runs_and_tracks_exact keeps EAP-IG-activations in the fast suite, and the
# exact-patching tests of tests/attribution/test_torch_oracle.py keep exact there.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("EAP-IG-activations", "UGS", "exact") else n
                                  for n in A.METHODS])
def test_every_registered_method_keeps_the_contract(name):
  """Over the registry (a new method is checked without touching this test): shape and dtype,
  zeros on invalid edges, finite and non-trivial scores, batch-size invariance, a resumed run
  bitwise equal to an uninterrupted one, refused interventions, and the per-batch result."""
  method = A.get_method(name)
  # Each method gets the small settings among these that it has (a keyword it has not is an
  # error): two IG steps, a few training steps for mask methods, and ACDC scoring by the task
  # metric (this random model's KL changes are ~1e-5).
  small = method.options_among(SMALL_OPTIONS)
  kw = dict(method=name, quiet=True, **small)
  valid = valid_edges(CFG)
  full = A.attribute(CFG, PARAMS, DATA, batch_size=3, **kw)  # 8 examples: batches of 3, 3, 2(+1)
  assert full.scores.shape == valid.shape and full.scores.dtype == np.float32
  assert np.all(full.scores[~valid] == 0) and np.all(np.isfinite(full.scores))
  scale = np.abs(full.scores[valid]).max()
  assert scale > 1e-3
  assert full.method == name and full.n_examples == len(DATA)
  if method.fit is not None:
    # Whole-dataset methods (mask training, greedy search) see every example at once: there are no
    # per-batch sums to resume or to split differently, so resuming and `score_batch` do not apply,
    # and `batch_size` only sizes the ablation's means. What remains: the same call (seeded) gives
    # the same scores whatever `batch_size`.
    again = A.attribute(CFG, PARAMS, DATA, batch_size=8, **kw)
    np.testing.assert_array_equal(again.scores, full.scores)
    assert again.clean_metric == pytest.approx(full.clean_metric, rel=1e-5)
    return

  one_batch = A.attribute(CFG, PARAMS, DATA, batch_size=8, **kw)
  # Exact scores are differences of float32 metrics: their rounding scales with the metric.
  tol = 1e-5 * max(scale, abs(full.clean_metric), 1.0)
  np.testing.assert_allclose(one_batch.scores, full.scores, atol=tol, rtol=1e-4)
  np.testing.assert_allclose(one_batch.clean_metric, full.clean_metric, rtol=1e-5)

  states = []
  A.attribute(CFG, PARAMS, DATA, batch_size=3, on_batch=states.append, **kw)
  assert [s.next_batch for s in states] == [1, 2, 3] and states[-1].seen == len(DATA)
  resumed = A.attribute(CFG, PARAMS, DATA, batch_size=3, resume=states[0], **kw)
  np.testing.assert_array_equal(resumed.scores, full.scores)
  assert resumed.clean_metric == full.clean_metric

  for intervention in A.INTERVENTIONS:
    if method.interventions is not None and intervention not in method.interventions:
      with pytest.raises(A.AttributionError, match="supports only"):
        A.attribute(CFG, PARAMS, DATA, intervention=intervention, **kw)

  batch = next(DATA.batches(3))  # the shape `full` ran: its program, compiled once
  out = method.score_batch(CFG, DATA.task, PARAMS, batch, A.Patching(),
                           method.make_options(**small))
  assert isinstance(out, A.BatchScores)
  assert out.scores.shape == valid.shape
  assert out.metric.shape == out.clean.shape == (3,)
  np.testing.assert_allclose(float(out.clean_total), float(np.sum(np.asarray(out.clean))),
                             rtol=1e-5)


def test_options_are_validated_by_their_method():
  with pytest.raises(A.AttributionError, match="ig_convention"):
    A.attribute(CFG, PARAMS, DATA, method="EAP-IG-activations", ig_convention="x", quiet=True)
  with pytest.raises(A.AttributionError, match="exact_chunk"):
    A.attribute(CFG, PARAMS, DATA, method="exact", exact_chunk=0, quiet=True)
  # An option a method has no field for is an error naming the method's options, never dropped.
  with pytest.raises(A.AttributionError, match="EAP has no option 'ig_steps'; its options are "
                                               "level, progress, remat"):
    A.get_method("EAP").make_options(ig_steps=0)
  with pytest.raises(A.AttributionError, match="EAP has no option 'ig_steps'"):
    A.attribute(CFG, PARAMS, DATA, method="EAP", ig_steps=5, quiet=True)
  with pytest.raises(A.AttributionError, match="either options or option keywords"):
    A.attribute(CFG, PARAMS, DATA, method="EAP", options=A.Options(), remat=True, quiet=True)
  assert A.get_method("EAP").options_among({"ig_steps": 5, "level": "node"}) == {"level": "node"}
  ens = A.get_method("EAP+EAP-IG-inputs")  # an ensemble's options: its members' and its own
  assert ens.options_among({"ig_steps": 5, "tau": 1.0}) == {"ig_steps": 5}
  assert ens.make_options(ig_steps=2).members[1].ig_steps == 2
  with pytest.raises(A.AttributionError, match="EAP\\+EAP-IG-inputs has no option 'tau'"):
    ens.make_options(tau=0.1)
  opts = A.IGOptions(ig_steps=3)
  a = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", options=opts, batch_size=8, quiet=True)
  b = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=3, batch_size=8, quiet=True)
  np.testing.assert_array_equal(a.scores, b.scores)


def test_whole_dataset_methods_run_through_fit(monkeypatch):
  """A method with `fit` (mask training, greedy search) is called once with the whole dataset; the
  driver checks and masks its scores and keeps its extras."""
  calls = []

  def fit(cfg, params, dataset, ablation, options):
    calls.append((len(dataset), ablation.kind, options.remat))
    return A.FitResult(np.ones(valid_edges(cfg).shape), clean_metric=1.5, extras={"steps": 3})

  monkeypatch.setitem(A.METHODS, "fake-fit", A.Method("fake-fit", "test", None, fit=fit))
  res = A.attribute(CFG, PARAMS, DATA, method="fake-fit", intervention="zero", remat=True,
                    quiet=True)
  assert calls == [(len(DATA), "zero", True)]
  valid = valid_edges(CFG)
  assert np.all(res.scores[valid] == 1) and np.all(res.scores[~valid] == 0)
  assert res.clean_metric == 1.5 and res.extras == {"steps": 3}


# ---------------------------------------------------------------------- the registry and Progress


def test_every_module_level_method_is_registered():
  """Scan the method modules: a module-level `Method` missing from METHODS (or registered under
  another object) fails, so a new method cannot be forgotten in the registry."""
  folder = pathlib.Path(A.__file__).parent
  found = {}
  for path in sorted(folder.glob("*.py")):
    module = importlib.import_module(f"jaxinterp.attribution.{path.stem}")
    for attr, obj in vars(module).items():
      if isinstance(obj, base.Method) and not isinstance(obj, A.ensemble.Ensemble):
        found[f"{path.stem}.{attr}"] = obj
  assert found, "no Method found: the scan is broken"
  unregistered = {k: m.name for k, m in found.items() if A.METHODS.get(m.name) is not m}
  assert not unregistered, f"module-level Methods not in attribution.METHODS: {unregistered}"
  assert set(A.METHODS) == {m.name for m in found.values()}


def _rows(dataset, sl):
  return dataclasses.replace(dataset, clean=dataset.clean[sl], corrupted=dataset.corrupted[sl],
                             lengths=dataset.lengths[sl],
                             labels={k: v[sl] for k, v in dataset.labels.items()})


@pytest.mark.parametrize("method,batch_size", [("EAP-IG-inputs", 4), ("EAP", 3)])
def test_progress_of_two_halves_merges_into_the_whole(method, batch_size):
  """`Progress` is a clu-style accumulator: the states of two halves of the dataset, attributed
  separately, merge into the state of the whole. With batches that line up (4 + 4 rows, batches of
  4) the sums add in the same order and equal the one-pass run bitwise; with batches that do not
  (3: batches 3+1 and 3+1 against 3+3+2) they agree to float32 rounding (rtol 1e-6)."""
  def final_state(data):
    states = []
    A.attribute(CFG, PARAMS, data, method, batch_size=batch_size, bootstrap=2, quiet=True,
                on_batch=states.append)
    return states[-1]

  first, second = final_state(_rows(DATA, slice(0, 4))), final_state(_rows(DATA, slice(4, 8)))
  whole = final_state(DATA)
  merged = first.merge(second)
  assert merged.seen == whole.seen == len(DATA)
  assert merged.next_batch == first.next_batch + second.next_batch
  assert len(merged.batch_sums) == merged.next_batch
  assert merged.batch_counts == first.batch_counts + second.batch_counts
  scores, clean = merged.compute()
  want_scores, want_clean = whole.compute()
  if batch_size == 4:
    np.testing.assert_array_equal(scores, want_scores)
    assert clean == want_clean
  else:
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-7)
    assert clean == pytest.approx(want_clean, rel=1e-6)
  one_pass = A.attribute(CFG, PARAMS, DATA, method, batch_size=batch_size, quiet=True).scores
  np.testing.assert_allclose(np.where(valid_edges(CFG), scores, 0), one_pass, rtol=1e-5,
                             atol=1e-6)
  empty = A.Progress.empty(scores.shape, keep_batches=True)  # merge's identity
  for state in (empty.merge(first), first.merge(empty)):
    assert (state.next_batch, state.seen, state.batch_counts) == (first.next_batch, first.seen,
                                                                   first.batch_counts)
    np.testing.assert_array_equal(state.score_sum, first.score_sum)


def test_checkpointer_round_trip_and_refusal(tmp_path):
  """A saved Progress loads back equal; a checkpoint of other settings is refused, naming them."""
  states = []
  A.attribute(CFG, PARAMS, DATA, "EAP", batch_size=3, bootstrap=2, quiet=True,
              on_batch=states.append)
  ckpt = A.Checkpointer(str(tmp_path / ".resume"), {"method": "EAP", "sizes": (1, 2)})
  assert ckpt.load() is None
  ckpt.save(states[0])
  ckpt.save(states[1])
  back = ckpt.load()
  assert back.next_batch == 2 and back.seen == states[1].seen
  np.testing.assert_array_equal(back.score_sum, states[1].score_sum)
  assert back.batch_counts == states[1].batch_counts
  assert sorted(p.name for p in (tmp_path / ".resume").iterdir()) == ["fingerprint.json",
                                                                      "step_000002"]
  other = A.Checkpointer(str(tmp_path / ".resume"), {"method": "exact", "sizes": (1, 2)})
  with pytest.raises(A.AttributionError, match="different run.*--method: checkpoint has 'EAP', "
                                               "now 'exact'"):
    other.load()
  ckpt.clear()
  assert not (tmp_path / ".resume").exists()
