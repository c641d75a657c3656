"""Attention explained: why a head attends where it does, as a table of its pre-softmax score.

    python -m experiments.explain_attention       # the toy's induction head a1.h0, induction row 0
    python -m experiments.explain_attention --model=DIR --head=a5.h1 --prompt="..." --out=runs/qk

--head's pre-softmax score at --query_pos, --key_pos as a table of (query-side x key-side) terms:
the EAP-IG senders upstream (--transcoders: MLP features) and biases (`jaxinterp.attribution.qk`);
the console checks that it sums to the score (--corrupted: the change clean - corrupted). Writes
qk.npz (the full table), qk.png (each side's --top_k terms) and DONE to --out once all is computed.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app

from jaxinterp import tasks
from jaxinterp.attribution import qk
from jaxinterp.experiments import cli, common
from jaxinterp.runtime import files, inputs
from jaxinterp.transcoders import TranscoderError, loading, toy
from jaxinterp.transcoders.pipeline import tokenize
from jaxinterp.viz import plots

cli.define("string", "model", "toy", "HF checkpoint or orbax dir, 'toy' or 'toy_mlp' (bundled).")
cli.define("string", "tokenizer", None, inputs.TOKENIZER_HELP)
cli.define("string", "transcoders", None, "circuit-tracer's transcoder config.yaml (or its dir): "
           "MLP terms split into features (e.g. jaxinterp/assets/toy_transcoders, toy_mlp).")
cli.define("string", "head", "a1.h0", "The head explained, a{layer}.h{head}.")
cli.define("string", "prompt", None, "The prompt (BOS is prepended); token ids separated by "
           "spaces for a model without a tokenizer. Default: row --row of --data.")
cli.define("string", "corrupted", None, "A corrupted prompt of the same token length: explain the "
           "change of the score, clean - corrupted; 'row' takes the --data row's corrupted prompt.")
cli.define("string", "data", None, "Task CSV (--task) of the default prompt, row --row; "
           "none: find_circuit's generated induction prompts.")
cli.define("string", "task", "induction", f"--data's task: {', '.join(tasks.task_names())}.")
cli.define("integer", "row", 0, "The --data row (0 = the first) used without --prompt.")
cli.define("integer", "query_pos", None, "Query position (< 0: from the end); default the last.")
cli.define("integer", "key_pos", None, "Key position (<= the query's); default the most attended.")
cli.define("integer", "top_k", 10, "Entries and terms shown by the console and each heatmap side.")
cli.define("string", "out", "runs/explain_attention", "Output directory.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)


def _tokens(model, flag: str, text: str) -> np.ndarray:
  try:
    return tokenize(model, text)[0]
  except TranscoderError as e:
    raise inputs.InputError(str(e).replace("--prompt", f"--{flag}")) from None


def _inputs(model) -> tuple[np.ndarray, np.ndarray | None]:
  """(clean, corrupted or None) token ids: --prompt, else row --row of --data; and --corrupted."""
  prompt, corrupted, row = (cli.value(n, d) for n, d in (("prompt", None), ("corrupted", None),
                                                         ("row", 0)))
  data, task = cli.value("data", None), cli.value("task", "induction")
  if prompt:
    clean, bad = _tokens(model, "prompt", prompt), None
  elif not data and task == "induction":
    ds = inputs.load_dataset(model, cli.value("model", "toy"), task, None, 64)  # find_circuit's
  else:
    inputs.input_file("data", data, " (a task CSV) when --prompt is not given")
    if model.tokenizer is None:
      raise inputs.InputError(f"--data={data}: the model has no tokenizer (give --tokenizer)")
    try:
      ds = tasks.load_task(task, data, model.tokenizer, bos_id=inputs.bos_id(model),
                           vocab_size=model.cfg.d_vocab)
    except tasks.TaskError as e:
      raise inputs.InputError(f"--data={data}: {e}") from None
  if not prompt and not 0 <= row < len(ds.clean):
    raise inputs.InputError(f"--row={row}: out of range; {data or 'the generated induction data'} "
                            f"has {len(ds.clean)} rows (0 to {len(ds.clean) - 1})")
  if not prompt:
    n = int(ds.lengths[row])
    clean, bad = ds.clean[row, :n], ds.corrupted[row, :n] if ds.has_corrupted else None
  if corrupted == "row" and bad is None:
    raise inputs.InputError("--corrupted=row needs a --data row that has a corrupted prompt")
  return clean, bad if corrupted == "row" else \
      _tokens(model, "corrupted", corrupted) if corrupted else None


def _plot(t: qk.QKTable, k: int, path: str, patched: bool) -> None:
  values, rows, cols = qk.top_grid(t, k)
  what = ("change (clean - corrupted) of the ", "change ", "+") if patched else ("", "", "")
  plots.plot_heatmap(
      values, path, xlabel=f"key-side term (at key position {t.key})",
      ylabel=f"query-side term (at query position {t.query})", xticklabels=cols,
      yticklabels=rows, title=f"{t.head}, query {t.query} -> key {t.key}: {what[0]}pre-softmax "
      f"score {t.score:+.3f} = sum of the table (pattern {what[1]}{t.pattern:{what[2]}.3f})",
      colorbar_label="contribution to the pre-softmax score (query term x key term)")


def _explain(model, clean, bad, tc, top_k: int):
  """Explain and report the score at the flags' positions (its change from `bad`): (t, p)."""
  query, key, head = (cli.value(n, d) for n, d in (("query_pos", None), ("key_pos", None),
                                                   ("head", "a1.h0")))
  keys = qk.explain_keys(model.cfg, model.params, clean, head, -1 if query is None else query,
                         transcoders=tc)  # every key's pattern
  most = max(keys, key=lambda x: x.pattern)
  at = (head, most.query, most.key if key is None else key)
  p = qk.explain_patching(model.cfg, model.params, clean, bad, *at, transcoders=tc) \
      if bad is not None else None
  t = p.delta if p else qk.explain_attention(model.cfg, model.params, clean, *at, transcoders=tc)
  text = [str(clean[i]) if model.tokenizer is None else repr(model.tokenizer.decode(
      [int(clean[i])])) for i in (t.query, t.key)]
  print(f"{t.head} on {cli.value('model', 'toy')} ({len(clean)} tokens): query {t.query} "
        f"({text[0]}) -> key {t.key} ({text[1]})\nattends most to key {most.key} (pattern "
        f"{most.pattern:.4f}); key terms, at their keys, raising the score most: " + ", ".join(
            f"{n}@{j} {x:+.2f}" for n, j, x in qk.rank_key_senders(keys, 3)))
  lines = [p.summary(0).split("\n")[0]] + [qk.check_line(x, f"the {w} table") for x, w in (
      (p.clean, "clean"), (p.corrupted, "corrupted"), (t, "difference"))] if p else \
      [f"pre-softmax score {t.score:+.4f}, pattern {t.pattern:.4f}", qk.check_line(t)]
  print("\n".join(lines + [qk.report(t, top_k)]))
  return t, p


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start_run()
  name, top_k = cli.value("model", "toy"), inputs.positive("top_k", cli.value("top_k", 10))
  model = inputs.load_model(toy.TOY_MLP_DIR if name == toy.TOY_MLP else name,
                            tokenizer=cli.value("tokenizer", None))
  tc = loading.load(tc_path, model.cfg) if (tc_path := cli.value("transcoders", None)) else None
  (clean, bad), out = _inputs(model), cli.value("out", "runs/explain_attention")
  record = files.RunRecord("explain_attention", {
      "model": name, "model_hash": inputs.model_hash(model), "transcoders": tc_path,
      "tokens": clean.tolist(), "corrupted": None if bad is None else bad.tolist(),
      **{n: cli.value(n, d) for n, d in (("head", "a1.h0"), ("query_pos", None),
                                         ("key_pos", None), ("top_k", 10))}}, ("model", "head"))
  with inputs.run_dir(out, record=record, overwrite=cli.value("overwrite", False)) as held:
    if held.complete:
      inputs.already_complete(out, record)
      return
    t, p = _explain(model, clean, bad, tc, top_k)  # every number, before anything is written
    fields = ("table", "query_names", "key_names", "score", "pattern", "head", "query", "key")
    arrays = {f: getattr(t, f) for f in fields} | {"tokens": clean}
    for s in ("clean", "corrupted") if p else ():  # and the tables whose difference t is
      arrays |= {f"{s}_{f}": getattr(getattr(p, s), f) for f in fields[:5]}
    arrays |= {"corrupted_tokens": bad} if p else {}
    with held.writing(["qk.npz", "qk.png"]):
      files.atomic_savez(os.path.join(out, "qk.npz"), **arrays)
      _plot(t, top_k, os.path.join(out, "qk.png"), p is not None)
  print(f"wrote {out}/qk.npz, {out}/qk.png")


if __name__ == "__main__":
  cli.run(main)
