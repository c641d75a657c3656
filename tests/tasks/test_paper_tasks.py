"""The EAP-IG paper's tasks by their own names, on their own CSV formats, and every metric the paper
defines, checked per example against an independent torch reimplementation of the paper's
definitions (`eap-ig-faithfulness/metrics.py`, `dataset.py`) on a random GPT-2 with the real
tokenizer.

The CSVs under `tests/fixtures/eap_ig/{task}/gpt2.csv` are small files written for these tests in
the paper's formats (its layout: `data/{task}/gpt2.csv`, the SVA verb list beside
`data/sva/gpt2.csv`).
"""

from __future__ import annotations

import ast
import csv
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models, tasks
from jaxinterp.tasks import TaskError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eap_ig"
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"
pytestmark = [pytest.mark.skipif(not TOKENIZER.exists(),
                                 reason="../shared/models/gpt2-tokenizer is absent"),
              pytest.mark.usefixtures("torch_one_thread")]

PAPER = {"ioi": "logit_diff", "greater-than": "prob_diff", "greater-than-price": "prob_diff",
         "greater-than-sequence": "prob_diff", "gender-bias": "logit_diff",
         "hypernymy-comma": "logit_diff", "fact-retrieval-comma": "prob_diff", "sva": "prob_diff"}
BOS = 50256


@pytest.fixture(scope="module")
def tok():
  from tokenizers import Tokenizer
  return Tokenizer.from_file(str(TOKENIZER))


def csv_path(task: str) -> Path:
  return FIXTURES / task / "gpt2.csv"


def test_every_paper_task_loads_by_its_own_name(tok):
  for task, default in PAPER.items():
    ds = tasks.load_task(task, csv_path(task), tok)
    assert ds.task.name == task and len(ds) >= 3, task
    assert tasks.metric_names(task)[0] == default
    assert tasks.with_metric(ds.task, default) == ds.task == tasks.get_task(task)
    other = tasks.with_metric(ds.task, "logit_diff" if default == "prob_diff" else "prob_diff")
    assert other.name.startswith(task + ":") and other.higher_is_better


def test_unknown_task_lists_every_name_the_papers_included():
  with pytest.raises(TaskError) as e:
    tasks.get_task("hypernymy-colon")
  for name in list(PAPER) + ["mcqa", "arc-easy", "arithmetic-addition", "country-capital"]:
    assert repr(name)[1:-1] in str(e.value)
  assert "paper's" in str(e.value) and "MIB's" in str(e.value)


def test_a_csv_of_another_task_says_which(tok, tmp_path):
  with pytest.raises(TaskError, match=r"answers_idx.*fit task 'hypernymy"):
    tasks.load_task("fact-retrieval-comma", csv_path("hypernymy-comma"), tok)
  with pytest.raises(TaskError, match=r"plural.*fit task 'greater-than'"):
    tasks.load_task("sva", csv_path("greater-than-price"), tok)
  # The IOI file has greater-than's one label column, but its ids are no years: it fits ioi better.
  with pytest.raises(TaskError, match=r"two-digit year.*fit task 'ioi'"):
    tasks.load_task("greater-than", csv_path("ioi"), tok)
  with pytest.raises(TaskError, match=r"fit task 'sva'"):
    tasks.load_task("ioi", csv_path("sva"), tok)


def test_metric_names_and_old_aliases(tok):
  ds = tasks.load_task("ioi", csv_path("ioi"), tok)
  assert tasks.with_metric(ds.task, "task") is ds.task
  for old, new in (("kl", "kl"), ("kl_divergence", "kl"), ("js", "js"), ("prob-diff", "prob_diff")):
    assert tasks.with_metric(ds.task, old).name == f"ioi:{new}"
  kl = tasks.with_metric(ds.task, "kl")
  assert kl.needs_clean_logits and not kl.higher_is_better
  assert not tasks.with_metric(ds.task, "cross-entropy").higher_is_better
  with pytest.raises(TaskError, match="has no 'prob_diff'.*log_prob"):
    tasks.with_metric(tasks.get_task("induction"), "prob_diff")
  with pytest.raises(TaskError, match="unknown metric"):
    tasks.with_metric(ds.task, "accuracy")
  assert tasks.get_task("arc_easy").name == "arc-easy"


# ---------------------------------------------------------------------------------------------
# An independent reimplementation of the paper's data reading and metrics (torch, float64).


def paper_tokens(tok, texts):
  """TransformerLens' `to_tokens(prepend_bos=True, padding_side='right')`: (tokens, lengths)."""
  ids = [[BOS] + tok.encode(t, add_special_tokens=False).ids for t in texts]
  n = max(map(len, ids))
  out = torch.full((len(ids), n), BOS, dtype=torch.long)
  for i, row in enumerate(ids):
    out[i, :len(row)] = torch.tensor(row)
  return out, torch.tensor([len(r) for r in ids])


def paper_verbs(tok, verb_csv, vocab, strict=True):
  """`get_singular_and_plural`: vocabulary tokens 'Ġverb' of the list; plural ones (strict) only
  if ' ' + their singular is one token."""
  with open(verb_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  sing, plur = [r["sing"] for r in rows], [r["plur"] for r in rows]
  by_id = {i: t for t, i in tok.get_vocab().items()}
  s_ids, p_ids = [], []
  for i in range(vocab):
    t = by_id.get(i)
    if t is None or not t.startswith("Ġ") or t[1:] not in set(sing) | set(plur):
      continue
    w = t[1:]
    if w in sing:
      s_ids.append(i)
    elif (len(tok.encode(" " + sing[plur.index(w)], add_special_tokens=False).ids) == 1
          or not strict):
      p_ids.append(i)
  return torch.tensor(s_ids), torch.tensor(p_ids)


def paper_metric(task, metric, logits, clean_logits, lengths, rows, tok, vocab):
  """The paper's `get_metric(metric, task)(..., mean=False, loss=False)` per example."""
  idx = torch.arange(logits.shape[0])
  at = logits[idx, lengths - 1]
  if metric in ("kl", "js"):
    p = torch.softmax(at, -1)
    q = torch.softmax(clean_logits[idx, lengths - 1], -1)
    if metric == "kl":
      return (q * (q.log() - p.log())).mean(-1)
    m = (0.5 * (p + q)).log()
    return 0.5 * ((p * (p.log() - m)).mean(-1) + (q * (q.log() - m)).mean(-1))
  prob = metric == "prob_diff"
  vals = torch.softmax(at, -1) if prob else at
  if "greater-than" in task:
    years = torch.tensor([tok.encode(f"{y:02d}").ids[0] for y in range(100)])
    out = []
    for v, r in zip(vals[:, years], rows, strict=True):
      y = int(r["correct_idx"])
      out.append(v[y + 1:].sum() - v[:y + 1].sum() if prob else v[y + 1:].mean() - v[:y + 1].mean())
    return torch.stack(out)
  if "hypernymy" in task:
    return torch.stack([v[torch.tensor(ast.literal_eval(r["answers_idx"]))].sum()
                        - v[torch.tensor(ast.literal_eval(r["corrupted_answers_idx"]))].sum()
                        for v, r in zip(vals, rows, strict=True)])
  if task == "sva":
    s, p = paper_verbs(tok, FIXTURES / "sva" / "combined_verb_list.csv", vocab)
    agg = (lambda x: x.sum(-1)) if prob else (lambda x: x.mean(-1))
    sing, plur = agg(vals[:, s]), agg(vals[:, p])
    label = torch.tensor([int(r["plural"]) for r in rows])
    return torch.where(label == 0, sing - plur, plur - sing)
  cols = {"ioi": ("correct_idx", "incorrect_idx"), "gender-bias": ("clean_answer_idx",
          "corrupted_answer_idx"), "fact-retrieval-comma": ("country_idx", "corrupted_country_idx")}
  labels = torch.tensor([[int(r[c]) for c in cols[task]] for r in rows])
  good_bad = torch.gather(vals, -1, labels)
  return good_bad[:, 0] - good_bad[:, 1]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A random-init GPT-2 with the real vocabulary (tiny width), saved as an HF checkpoint with the
  real tokenizer, loaded by jaxinterp; and the torch model itself."""
  torch.manual_seed(0)
  conf = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 initializer_range=0.5)
  hf = transformers.GPT2LMHeadModel(conf).eval()
  path = tmp_path_factory.mktemp("gpt2-random")
  hf.save_pretrained(str(path))
  shutil.copy(TOKENIZER, path / "tokenizer.json")
  return models.from_pretrained(str(path)), hf


@pytest.mark.parametrize("task", [pytest.param(t, marks=[pytest.mark.slow, pytest.mark.by_hand])
                                  if t in ("hypernymy-comma", "gender-bias",
                                           "greater-than-sequence") else t
                                  for t in PAPER])
def test_every_metric_agrees_with_the_paper(task, gpt2, tok):
  model, hf = gpt2
  path = csv_path(task)
  ds = tasks.load_task(task, path, model.tokenizer, vocab_size=model.cfg.d_vocab)
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  clean, lengths = paper_tokens(tok, [r["clean"] for r in rows])
  corrupted, _ = paper_tokens(tok, [r["corrupted"] for r in rows])
  np.testing.assert_array_equal(ds.clean, clean.numpy())
  np.testing.assert_array_equal(ds.corrupted, corrupted.numpy())
  np.testing.assert_array_equal(ds.lengths, lengths.numpy())
  mask = (torch.arange(clean.shape[1])[None] < lengths[:, None]).long()
  hf64 = hf.double()  # both sides in float64: the comparison is of the metrics, not of rounding
  with torch.no_grad():
    ref_clean = hf64(clean, attention_mask=mask).logits
    ref_corrupted = hf64(corrupted, attention_mask=mask).logits
  hf.float()

  batch = next(ds.batches(len(ds), bucket=None))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), model.params)
    fwd = jax.jit(lambda t: models.forward(model.cfg, p64, t, attention_mask=batch.mask))
    our_clean, our_corrupted = fwd(batch.clean), fwd(batch.corrupted)
    for metric in ("logit_diff", "prob_diff", "kl", "js"):
      t = tasks.with_metric(ds.task, metric)
      patched = our_corrupted if metric in ("kl", "js") else our_clean
      got = np.asarray(t.metric(patched, batch, our_clean), np.float64)
      ref_patched = ref_corrupted if metric in ("kl", "js") else ref_clean
      want = paper_metric(task, metric, ref_patched, ref_clean, lengths, rows, tok, 50257).numpy()
      assert np.all(want != 0), (task, metric)
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{task} {metric}")
      # Probabilities of a few of 50,257 tokens, KL and JS (averaged over the vocabulary) are
      # tiny: they agree relatively too.
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-14, err_msg=f"{task} {metric}")


def test_sva_answer_sets_follow_the_verb_list_and_its_strict_flag(tok):
  verbs = FIXTURES / "sva" / "combined_verb_list.csv"
  sing, plur = tasks.sva_verb_sets(verbs, tok, 50257)
  ref_s, ref_p = paper_verbs(tok, verbs, 50257)
  np.testing.assert_array_equal(sing, ref_s.numpy())
  np.testing.assert_array_equal(plur, ref_p.numpy())
  wander = tok.token_to_id("Ġwander")  # " wanders" is two tokens: strict leaves " wander" out
  assert wander not in plur and wander in tasks.sva_verb_sets(verbs, tok, 50257, strict=False)[1]
  # The CSV's directory holds the list (the paper's layout), so load_task uses it by default.
  ds = tasks.load_task("sva", csv_path("sva"), tok)
  for row, plural in enumerate(ds.labels["plural"]):
    right = ds.labels["correct"][row]
    np.testing.assert_array_equal(right[right >= 0], plur if plural else sing)
  with pytest.raises(TaskError, match="'sing' and 'plur'"):
    tasks.sva_verb_sets(csv_path("ioi"), tok)
