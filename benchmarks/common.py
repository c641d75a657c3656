"""Shared pieces of the benchmarks: model shapes, data, the torch baseline's inputs, timing.

Importing this module imports jax and jaxinterp (its data loaders), never torch: the whole-process
benchmark's torch processes tokenise with it too, so every implementation pays the same import.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import tasks
from jaxinterp.attribution import Patching, edge_pruning, ugs
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models import init_params
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.pretrained import from_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IOI_CSV = SHARED / "data" / "eap-ig" / "ioi" / "gpt2.csv"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"

# Published architecture shapes (from the models' config.json), random-init only: there are no real
# weights here. `tiny` is the --quick shape.
SHAPES = {
    "tiny": dict(family="gpt2", d_model=64, n_layers=2, n_heads=4, d_mlp=256, d_vocab=512,
                 n_ctx=128),
    "gpt2-small": dict(family="gpt2", d_model=768, n_layers=12, n_heads=12, d_mlp=3072,
                       d_vocab=50257, n_ctx=1024),
    "gpt2-medium": dict(family="gpt2", d_model=1024, n_layers=24, n_heads=16, d_mlp=4096,
                        d_vocab=50257, n_ctx=1024),
    "gpt2-large": dict(family="gpt2", d_model=1280, n_layers=36, n_heads=20, d_mlp=5120,
                       d_vocab=50257, n_ctx=1024),
    "gpt2-xl": dict(family="gpt2", d_model=1600, n_layers=48, n_heads=25, d_mlp=6400,
                    d_vocab=50257, n_ctx=1024),
    "pythia-1b": dict(family="gpt_neox", d_model=2048, n_layers=16, n_heads=8, d_mlp=8192,
                      d_vocab=50304, n_ctx=2048),
    "llama-3.1-8b": dict(family="llama", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         d_mlp=14336, d_vocab=128256, n_ctx=8192),
}


def dist_version(dist: str) -> str:
  """The installed version of a distribution, or "?"."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "?"


class BenchmarkError(ValueError):
  """Bad benchmark arguments (unknown suite or shape, ...)."""


def model_config(shape: str):
  """A `ModelConfig` for a named shape (see SHAPES)."""
  if shape not in SHAPES:
    raise BenchmarkError(f"unknown model shape {shape!r}; choose from {sorted(SHAPES)}")
  s = dict(SHAPES[shape])
  fam = s.pop("family")
  d, H = s["d_model"], s["n_heads"]
  kw = dict(family=fam, d_head=d // H, **s)
  if fam == "gpt2":
    kw.update(normalization="layernorm", positional="learned", act_fn="gelu_new",
              tied_embeddings=True)
  elif fam == "gpt_neox":
    kw.update(normalization="layernorm", positional="rotary", rotary_dim=(d // H) // 4,
              parallel_attn_mlp=True, act_fn="gelu", attn_bias=True, attn_out_bias=True,
              tied_embeddings=False)
  elif fam == "llama":
    kw.update(normalization="rmsnorm", norm_eps=1e-5, positional="rotary", rotary_dim=d // H,
              rope_theta=500000.0, rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                 ("low_freq_factor", 1.0),
                                                 ("original_max_position_embeddings", 8192),
                                                 ("rope_type", "llama3")),
              gated_mlp=True, mlp_bias=False, act_fn="silu",
              attn_bias=False, attn_out_bias=False, tied_embeddings=False)
  return ModelConfig(**kw)


def n_params(cfg) -> int:
  """Parameter count of a config (embeddings included, tied once)."""
  d, L, H, dh, m, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
  kv = getattr(cfg, "kv_heads", H)
  attn = d * dh * (2 * H + 2 * kv)
  mlp = d * m * (3 if cfg.gated_mlp else 2)
  emb = V * d * (1 if cfg.tied_embeddings else 2)
  return L * (attn + mlp) + emb


def block_flops_per_token(cfg, seq: int) -> float:
  """Matmul FLOPs of all blocks of one plain forward, per token (2 per multiply-add), attention
  included (full square; causal masking would halve that part)."""
  d, L, H, dh, m = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_mlp
  kv = getattr(cfg, "kv_heads", H)
  per_layer = 2 * d * dh * (2 * H + 2 * kv) + 2 * d * m * (3 if cfg.gated_mlp else 2)
  per_layer += 2 * 2 * seq * H * dh  # scores and pattern @ v
  return L * per_layer


def eap_ig_flops(cfg, n_examples: int, seq: int, steps: int) -> float:
  """FLOPs EAP-IG-inputs needs with `steps` IG steps (`steps=1`: EAP), for MFU-style figures.

  Two plain forwards (the clean and corrupted sender outputs) and per step a forward plus a backward
  w.r.t. activations only (no weight gradients: about one more forward), i.e. 2 + 2m forwards of
  the blocks (12 for m = 5; the issue's "about 15 forward-equivalents" counts the backward as two);
  the unembedding at the metric's position only; and the sender x receiver contraction, 2 d_model
  FLOPs per valid edge per token.
  """
  n_edges = int(np.sum(valid_edges(cfg)))
  forwards = 2 + 2 * steps
  per_example = forwards * (block_flops_per_token(cfg, seq) * seq + 2 * cfg.d_model * cfg.d_vocab)
  return n_examples * (per_example + 2 * n_edges * cfg.d_model * seq)


# ------------------------------------------------------------------------------------------ data


def gpt2_checkpoint(out_dir: str, shape: str = "gpt2-small", seed: int = 0) -> str:
  """Write a random-init HF GPT-2 checkpoint of a SHAPES entry (once; reused if present)."""
  s = SHAPES[shape]
  if s["family"] != "gpt2":
    raise BenchmarkError(f"gpt2_checkpoint needs a gpt2 shape, got {shape!r}")
  if os.path.exists(os.path.join(out_dir, "config.json")):
    return out_dir
  import torch
  import transformers
  torch.manual_seed(seed)
  conf = transformers.GPT2Config(n_embd=s["d_model"], n_layer=s["n_layers"], n_head=s["n_heads"],
                                 n_inner=s["d_mlp"], vocab_size=s["d_vocab"],
                                 n_positions=s["n_ctx"], bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(conf).eval()
  tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or None)
  model.save_pretrained(tmp)
  os.replace(tmp, out_dir)
  return out_dir


def ioi_or_random(n: int, vocab_size: int, seq: int = 16, seed: int = 0):
  """The first `n` IOI examples (GPT-2 tokenizer) if ../shared exists and fits the vocabulary,
  else random equal-length token pairs of length `seq` with a logit-difference metric.

  Returns (Dataset, source description).
  """
  if IOI_CSV.exists() and GPT2_TOKENIZER.exists() and vocab_size >= 50257:
    ds = tasks.load_task("ioi", IOI_CSV, GPT2_TOKENIZER, n_examples=n, vocab_size=vocab_size)
    return ds, f"IOI ({IOI_CSV.name}, first {len(ds)} rows, max length {ds.max_len})"
  return random_pairs(n, vocab_size, seq, seed), f"random token pairs (length {seq})"


def random_pairs(n: int, vocab_size: int, seq: int, seed: int = 0):
  """Random clean/corrupted pairs of equal length `seq` (BOS 0 first), metric logit-diff."""
  rng = np.random.default_rng(seed)
  clean = rng.integers(1, vocab_size, (n, seq), dtype=np.int32)
  clean[:, 0] = 0
  corrupted = clean.copy()
  corrupted[:, seq // 2] = rng.integers(1, vocab_size, n)
  labels = {"correct": rng.integers(1, vocab_size, n).astype(np.int32),
            "incorrect": rng.integers(1, vocab_size, n).astype(np.int32)}
  return tasks.Dataset(task=tasks.get_task("logit-diff"), clean=clean, corrupted=corrupted,
                       lengths=np.full(n, seq, np.int32), labels=labels, pad_id=0, bos_id=0,
                       source=f"random_pairs(n={n}, seq={seq}, seed={seed})")


def torch_batch(ds):
  """The dataset as the torch baseline's tensors: (clean, corrupted, mask, last, correct,
  incorrect)."""
  import torch  # optional: the torch baselines
  mask = np.arange(ds.clean.shape[1])[None, :] < ds.lengths[:, None]
  correct = ds.labels["correct"]
  incorrect = ds.labels["incorrect"]
  if correct.ndim != 1 or incorrect.ndim != 1:
    raise BenchmarkError("the torch baseline takes single-token answers (a logit-diff task)")

  def t(a):
    return torch.as_tensor(np.asarray(a, np.int64))

  return (t(ds.clean), t(ds.corrupted), t(mask.astype(np.int64)), t(ds.lengths - 1), t(correct),
          t(incorrect))


def mask_step_calls(cfg, task, params, u_opts, e_opts, u_batch, e_batch) -> dict:
  """{"UGS": (ugs.train_step, args), "edge-pruning": (edge_pruning.train_step, args)}: the first
  step of each mask method (patching ablation, fresh state, key 0) on its batch, as the
  `methods`, `compile` and `mask_steps` suites time or compile it."""
  abl, key, i = Patching(), jax.random.PRNGKey(0), jnp.asarray(0, jnp.int32)
  lr = ugs.default_lr(u_opts.reg_lamb, "patching")
  return {"UGS": (ugs.train_step, (cfg, task, u_opts, lr, params, abl, ugs.init_state(cfg, lr),
                                   u_batch, key, i)),
          "edge-pruning": (edge_pruning.train_step,
                           (cfg, task, e_opts, params, abl, edge_pruning.init_state(cfg, e_opts),
                            e_batch, key, i))}


# ---------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Wall-clock seconds of repeated calls after a warm-up (compile) call."""

  first_s: float  # the warm-up call: compile + one run
  times_s: list

  @property
  def best_s(self) -> float:
    return min(self.times_s)

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  def as_dict(self) -> dict:
    return dict(first_call_s=self.first_s, best_s=self.best_s, median_s=self.median_s,
                repeats=self.times_s)


def time_calls(fn: Callable[[], object], repeats: int = 3, warmup: bool = True) -> Timing:
  """Time `fn()` (which must block until its result is ready) `repeats` times after one warm-up."""
  first = float("nan")
  if warmup:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return Timing(first, times)


def load_average() -> list | None:
  """The 1/5/15-minute load averages (the CPU is shared: numbers are noisy when this is high)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict:
  """Device, versions and load, for the results file."""
  dev = jax.devices()[0]
  env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), jax_version=jax.__version__,
             backend=jax.default_backend(), device=str(dev.device_kind),
             n_devices=jax.device_count(), cpu_count=os.cpu_count(),
             platform=platform.platform(), python=platform.python_version(),
             load_average=load_average())
  try:
    import torch
    env["torch_version"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  try:
    env["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return env


def matmul_peak_gflop_s(m: int = 1536, k: int = 768, n: int = 2304, repeats: int = 5) -> float:
  """What a plain float32 XLA matmul reaches on this device now (the MFU reference)."""
  a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t)
  return 2 * m * k * n / best / 1e9


def write_json(obj, path: str) -> None:
  """Write JSON atomically."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


class Ctx:
  """Shapes, checkpoints and data shared by the suites of one run."""

  def __init__(self, workdir: str, quick: bool):
    self.workdir = workdir
    self.quick = quick
    self._models = {}

  def model(self, shape: str, dtype=None):
    """(cfg, params, hf_dir or None) of a shape; GPT-2 shapes go through a HF checkpoint."""
    key = (shape, str(dtype))
    if key not in self._models:
      if SHAPES[shape]["family"] == "gpt2":
        d = gpt2_checkpoint(os.path.join(self.workdir, shape), shape)
        m = from_pretrained(d, dtype=dtype or jnp.float32)
        self._models[key] = (m.cfg, m.params, d)
      else:
        cfg = model_config(shape)
        params = init_params(cfg, jax.random.PRNGKey(0), dtype=dtype or jnp.float32)
        self._models[key] = (cfg, params, None)
    return self._models[key]

  def data(self, cfg, n: int):
    return ioi_or_random(n, cfg.d_vocab, seq=16)
