"""Attribution graphs, whole process: jaxinterp's binary against circuit-tracer 0.5.0, same graph.

    python -m benchmarks.attribution_graph                      # mid size, results JSON printed
    python -m benchmarks.attribution_graph --json_out=results.json          # and saved
    python -m benchmarks.attribution_graph --suite=long_prompt  # a 4k-token prompt, host memory

`--suite=speed` (default). Setup (not timed): a random GPT-2-style HF checkpoint (`--n_layers` 6,
`--d_model` 256, 8 heads, d_mlp 4 * d_model, `--vocab` 2048, bos 0) saved with transformers, a set
of random per-layer ReLU transcoders (`--d_transcoder` 4096 features per layer, reading
`mlp.hook_in`, writing `hook_mlp_out`; the encoder bias sets about `--active_per_token` active
features per token and layer) written in circuit-tracer's format, and a `--n_pos`-token prompt (BOS
and random ids). Then, each as one fresh process timed from its start to its exit (imports, loading,
attribution, pruning, writing the dense graph and graph.json), with its peak resident memory (RSS
high water, `wait4`'s `ru_maxrss`):

- `jaxinterp cold`: `python -m experiments.attribution_graph` with an empty persistent compilation
  cache (every kernel compiled, the cache written), `--batch_size` its default 128;
- `jaxinterp warm`: the same command again, reading that cache;
- `circuit-tracer`: `benchmarks/attribution_graph_ct.py run` in circuit-tracer's virtual environment
  (`--ct_python`, default $JAXINTERP_CIRCUIT_TRACER_PYTHON or ../ct-venv/bin/python),
  `TransformerLensReplacementModel` with `attribute(batch_size=512)`, its default.

The ratios are circuit-tracer's seconds over jaxinterp's, measured in the same run. Both use every
core (torch's default threads, XLA:CPU's). The two processes build the same graph: the benchmark
checks that the logit targets and the number of active features agree.

`--suite=long_prompt`: jaxinterp alone on prompts of each of `--long_pos` tokens (default 4096;
a comma-separated list runs each) of a small model (2 layers, d_model 64, 8 heads, 512 features per
layer, about 8 active per token and layer), with `--max_feature_nodes` features kept. Each is one
fresh process (`--compilation_cache=`, so every kernel compiles), first on a `FIXED_POS`-token
prompt: its peak RSS is the fixed cost `R0` (interpreter, imports, XLA, the compiled kernels). Each
row has the process's seconds and peak RSS, the graph's sizes, and `memory_bound`'s terms: the
bound of docs/transcoders.md ("Long prompts: host memory"), `FIXED_ALLOWANCE * R0` plus the largest
phase, which the peak must stay under.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from jaxinterp import transcoders as T

_SUITE = flags.DEFINE_enum("suite", "speed", ["speed", "long_prompt"], "What to run.")
_JSON = flags.DEFINE_string("json_out", "", "Write the results JSON here (also printed).")
_CT = flags.DEFINE_string(
    "ct_python", os.environ.get("JAXINTERP_CIRCUIT_TRACER_PYTHON",
                                str(common.REPO.parent / "ct-venv" / "bin" / "python")),
    "Python of circuit-tracer's virtual environment.")
_L = flags.DEFINE_integer("n_layers", 6, "Layers.")
_D = flags.DEFINE_integer("d_model", 256, "Model width.")
_F = flags.DEFINE_integer("d_transcoder", 4096, "Transcoder features per layer.")
_POS = flags.DEFINE_integer("n_pos", 32, "Prompt tokens, BOS included.")
_VOCAB = flags.DEFINE_integer("vocab", 2048, "Vocabulary size.")
_ACTIVE = flags.DEFINE_float("active_per_token", 24.0, "Expected active features per token and "
                             "layer (sets the encoder bias).")
_LONG = flags.DEFINE_list("long_pos", ["4096"], "--suite=long_prompt: prompt tokens, BOS included "
                          "(a comma-separated list: one process each).")
_MAX_FEAT = flags.DEFINE_integer("max_feature_nodes", 1024, "--suite=long_prompt: features kept.")

CT_BATCH = 512  # circuit-tracer's `attribute` default
JAX_BATCH = 128  # experiments.attribution_graph's default
FIXED_POS = 64  # --suite=long_prompt: the prompt whose peak RSS is the fixed cost
FIXED_ALLOWANCE = 1.2  # the fixed cost's variation between processes and prompt shapes (<= 20%)
LONG_SHAPE = dict(n_layers=2, d_model=64, n_heads=8, d_mlp=256, vocab=512, d_transcoder=512,
                  active_per_token=8.0)
ROOT = str(common.REPO)


def build_model(directory: str, n_layers: int, d_model: int, vocab: int, n_ctx: int,
                seed: int = 0) -> None:
  """A random GPT-2 checkpoint (transformers' initialisation, norms perturbed), bos/eos 0."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(seed)
  hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model,
                                  n_layer=n_layers, n_head=8, activation_function="gelu_new",
                                  bos_token_id=0, eos_token_id=0))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 1 and "ln" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
  hf.save_pretrained(directory, safe_serialization=True)


def build_transcoders(directory: str, n_layers: int, d_model: int, d_transcoder: int,
                      active_per_token: float, seed: int = 0) -> None:
  """Random ReLU transcoders in circuit-tracer's format. The input (`mlp.hook_in`, ln2's output)
  has entries of about unit scale, so `W_enc`'s columns of norm ~1 give unit-variance
  pre-activations, and `b_enc` = -z with P(N(0,1) > z) = active / d_transcoder."""
  import jax.numpy as jnp
  from scipy.stats import norm
  rng = np.random.default_rng(seed)
  z = float(norm.isf(active_per_token / d_transcoder))
  L, d, F = n_layers, d_model, d_transcoder

  def a(*s, scale=1.0):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  tc = T.PerLayerTranscoders(a(L, d, F, scale=d ** -0.5), jnp.full((L, F), -z, jnp.float32),
                             a(L, F, d, scale=0.05), a(L, d, scale=0.01),
                             input_hook="mlp.hook_in", output_hook="hook_mlp_out")
  T.save_transcoder_set(tc, directory)


# A small process that runs the command and writes its peak RSS (KiB) to a file: a child forked
# from this benchmark's own large process would inherit its RSS high water in `ru_maxrss`.
_WRAPPER = """
import os, resource, sys
pid = os.fork()
if pid == 0:
  os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], work: str) -> dict:
  """Run `cmd` as a fresh process from the repository root: its wall seconds, its own peak RSS
  (`wait4`'s `ru_maxrss`, MiB) and its last stdout line parsed as JSON (None if not JSON)."""
  rss_file = os.path.join(work, "rss.txt")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, rss_file, *cmd], cwd=ROOT,
                        capture_output=True)
  seconds = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n"
                       f"{proc.stderr.decode()[-3000:]}")
  with open(rss_file) as fh:
    rss_kib = int(fh.read())
  lines = proc.stdout.decode().strip().splitlines()
  try:
    parsed = json.loads(lines[-1]) if lines else None
  except json.JSONDecodeError:
    parsed = None
  return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1),
          "stdout_tail": lines[-3:], "result": parsed}


def jax_cmd(model: str, tcs: str, tokens: list[int], out: str, cache: str,
            max_feature_nodes: int | None = None) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.attribution_graph", f"--model={model}",
         f"--transcoders={tcs}", f"--prompt={' '.join(map(str, tokens))}", f"--out={out}",
         f"--batch_size={JAX_BATCH}", f"--compilation_cache={cache}"]
  if max_feature_nodes is not None:
    cmd.append(f"--max_feature_nodes={max_feature_nodes}")
  return cmd


def _npz_summary(out: str) -> dict:
  g = T.load_npz(os.path.join(out, "graph.npz"))
  return {"n_active": len(g.active_features), "n_features": g.n_features, "nodes": g.n_nodes,
          "logit_tokens": g.logit_tokens.tolist()}


def suite_speed(work: str) -> dict:
  L, d, F, P, V = _L.value, _D.value, _F.value, _POS.value, _VOCAB.value
  model, tcs, tok = (os.path.join(work, x) for x in ("model", "transcoders", "tokenizer"))
  build_model(model, L, d, V, max(64, P))
  build_transcoders(tcs, L, d, F, _ACTIVE.value)
  subprocess.run([_CT.value, os.path.join(ROOT, "benchmarks", "attribution_graph_ct.py"),
                  "tokenizer", tok, str(V)], check=True, cwd=ROOT)
  tokens = [0] + np.random.default_rng(1).integers(1, V, P - 1).tolist()
  config = os.path.join(tcs, "config.yaml")
  cache = os.path.join(work, "jax_cache")
  rows = {}
  rows["jaxinterp cold"] = run_measured(jax_cmd(model, config, tokens, os.path.join(work, "j1"),
                                                cache), work)
  rows["jaxinterp cold"]["graph"] = _npz_summary(os.path.join(work, "j1"))
  rows["jaxinterp warm"] = run_measured(jax_cmd(model, config, tokens, os.path.join(work, "j2"),
                                                cache), work)
  spec = {"model": model, "tokenizer": tok, "transcoders": config, "tokens": tokens,
          "out": os.path.join(work, "ct"), "max_n_logits": 10, "desired_logit_prob": 0.95,
          "ct_batch_size": CT_BATCH, "node_threshold": 0.8, "edge_threshold": 0.98}
  with open(os.path.join(work, "ct_spec.json"), "w") as fh:
    json.dump(spec, fh)
  rows["circuit-tracer"] = run_measured(
      [_CT.value, os.path.join(ROOT, "benchmarks", "attribution_graph_ct.py"), "run",
       os.path.join(work, "ct_spec.json")], work)
  ct = rows["circuit-tracer"]["result"]
  jg = rows["jaxinterp cold"]["graph"]
  same = ct["n_active"] == jg["n_active"] and ct["logit_tokens"] == jg["logit_tokens"]
  t_ct = rows["circuit-tracer"]["seconds"]
  return {"shape": dict(n_layers=L, d_model=d, n_heads=8, d_mlp=4 * d, vocab=V,
                        d_transcoder=F, n_pos=P, active_per_token=_ACTIVE.value,
                        jax_batch_size=JAX_BATCH, ct_batch_size=CT_BATCH),
          "rows": rows, "same_graph": same,
          "speedup": {k: round(t_ct / rows[k]["seconds"], 2)
                      for k in ("jaxinterp cold", "jaxinterp warm")},
          "memory_ratio": {k: round(rows["circuit-tracer"]["peak_rss_mib"]
                                    / rows[k]["peak_rss_mib"], 2)
                           for k in ("jaxinterp cold", "jaxinterp warm")}}


def memory_bound(n_pos: int, n_layers: int, n_heads: int, d_model: int, d_mlp: int,
                 n_features_per_layer: int, batch_size: int, graph: dict, chunks: int,
                 chunk: int) -> dict:
  """docs/transcoders.md's bound on a run's peak RSS beyond its fixed cost, per term (MiB), for
  per-layer transcoders: the largest of the forward (the linearised run's attention and the dense
  feature activations), the rows phase (the linearised run, the sources' vectors,
  one batch's XLA temporaries, two batches' rows, the host's rows) and the pruning phase (the
  adjacency's non-zero rows, the edge scores' positive entries and their sort, and pruning's N x N
  arrays: two float32, three bool).

  graph: `_npz_summary`'s sizes. chunks, chunk: the decoder entries' `C` chunks of `G` entries.
  """
  n, L, H, d, B, C, G = n_pos, n_layers, n_heads, d_model, batch_size, chunks, chunk
  A, T = graph["n_active"], len(graph["logit_tokens"])
  R, S, N = graph["n_features"] + T, A + (L + 1) * n + T, graph["nodes"]
  rows = {"linearised run: attention patterns 4 L H n^2 + residuals 4 L n (d_mlp + 2 d)":
          4 * L * n * (H * n + d_mlp + 2 * d),
          "sources' vectors 4 (C G d + 2 A d + (L + 1) n d)":
          4 * (C * G * d + 2 * A * d + (L + 1) * n * d),
          "one batch's temporaries 4 B ((2 L + 1) n d + C (d + G))":
          4 * B * ((2 * L + 1) * n * d + C * (d + G)),
          "two batches' rows 8 B S": 8 * B * S,
          "host rows and the ranking's normalised copy 8 R S": 8 * R * S}
  forward = {"the forward: L layers' attention kept, one computed 4 (L + 1) H n^2":
             4 * (L + 1) * H * n * n,
             "feature activations 4 L n F": 4 * L * n * n_features_per_layer}
  prune = {"adjacency's rows, the edge scores' positives, their sort 16 R N": 16 * R * N,
           "pruning's N x N arrays 11 N^2": 11 * N * N}

  def mib(terms: dict) -> dict:
    return {k: round(v / 2 ** 20, 1) for k, v in terms.items()}

  phases = (forward, rows, prune)
  return {"forward_phase_mib": mib(forward), "rows_phase_mib": mib(rows),
          "pruning_phase_mib": mib(prune),
          "bound_mib": round(max(sum(p.values()) for p in phases) / 2 ** 20, 1)}


def _chunks(out: str, n_pos: int) -> tuple[int, int]:
  """The graph's decoder entries' chunk count `C` and size `G` (`attribution.cell_chunks`)."""
  g = T.load_npz(os.path.join(out, "graph.npz"))
  cells = g.active_features[:, 0] * n_pos + g.active_features[:, 1]
  counts = np.unique(cells, return_counts=True)[1]
  G = T.attribution.chunk_size(counts)
  return int(np.maximum(-(-counts // G), 1).sum()), G


def _phases(row: dict) -> str:
  return next((x for x in row["stdout_tail"] if x.startswith("phases:")), "")


def suite_long_prompt(work: str) -> dict:
  s = LONG_SHAPE
  L, d, F, V = s["n_layers"], s["d_model"], s["d_transcoder"], s["vocab"]
  try:
    lengths = [int(x) for x in _LONG.value]
  except ValueError:
    raise app.UsageError(f"--long_pos must be integers, got {','.join(_LONG.value)}") from None
  if not lengths or min(lengths) < 2:
    raise app.UsageError("--long_pos: each prompt needs at least 2 tokens (BOS and one more)")
  model, tcs = os.path.join(work, "model"), os.path.join(work, "transcoders")
  build_model(model, L, d, V, max(max(lengths), FIXED_POS))
  build_transcoders(tcs, L, d, F, s["active_per_token"])
  config = os.path.join(tcs, "config.yaml")

  def run(n_pos: int) -> dict:
    tokens = [0] + np.random.default_rng(1).integers(1, V, n_pos - 1).tolist()
    out = os.path.join(work, f"out{n_pos}")
    row = run_measured(jax_cmd(model, config, tokens, out, "", _MAX_FEAT.value), work)
    row["graph"] = _npz_summary(out)
    row["phases"] = _phases(row)
    row["chunks"] = _chunks(out, n_pos)
    return row

  fixed = run(FIXED_POS)
  r0 = fixed["peak_rss_mib"]
  rows = []
  for n_pos in lengths:
    row = run(n_pos)
    g = row["graph"]
    row["n_pos"] = n_pos
    row["rows"] = g["n_features"] + len(g["logit_tokens"])
    row["sources"] = g["n_active"] + (L + 1) * n_pos + len(g["logit_tokens"])
    row["bound"] = memory_bound(n_pos, L, s["n_heads"], d, s["d_mlp"], F, JAX_BATCH, g,
                                *row["chunks"])
    row["bound_with_fixed_mib"] = round(FIXED_ALLOWANCE * r0 + row["bound"]["bound_mib"], 1)
    row["within_bound"] = row["peak_rss_mib"] <= row["bound_with_fixed_mib"]
    rows.append(row)
    print(f"n_pos {n_pos}: {row['seconds']} s, peak RSS {row['peak_rss_mib']} MiB, bound "
          f"{row['bound_with_fixed_mib']} MiB", file=sys.stderr, flush=True)
  return {"shape": dict(**s, max_feature_nodes=_MAX_FEAT.value, batch_size=JAX_BATCH,
                        fixed_pos=FIXED_POS),
          "fixed": fixed, "rows": rows, "all_within_bound": all(r["within_bound"] for r in rows)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as work:
    res = suite_speed(work) if _SUITE.value == "speed" else suite_long_prompt(work)
  res = {"suite": _SUITE.value, "environment": common.environment(), **res}
  text = json.dumps(res, indent=1)
  print(text)
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      fh.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
