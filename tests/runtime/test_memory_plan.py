"""Memory plans (`--dry_run`): sizes, configs without weights, bad input, and the estimate checked
against a measured peak.

The measured peak: the planned program runs in a fresh process with glibc's mmap threshold fixed
(every buffer over 64 kB is its own mapping, so freed heap from the compile is not reused); the
process's resident-set high-water mark is reset (`/proc/self/clear_refs`, 5) just before the run,
so VmHWM - VmRSS is what the run itself allocated and touched: its temporaries and outputs. The plan
must be within 25% of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxinterp.attribution import exact as X
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.runtime import memory_programs as PR
from jaxinterp.transcoders import memory_programs as GP

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxinterp.models.config import ModelConfig
    from jaxinterp.models.transformer import init_params
    from jaxinterp.runtime import memory_plan as MP, memory_programs as PR

    def status(field):
      for line in open("/proc/self/status"):
        if line.startswith(field):
          return int(line.split()[1]) * 1024

    cfg = ModelConfig(**json.loads(sys.argv[1]))
    b, p = 8, 128
    fn, args = PR.eap(cfg, MP.abstract_params(cfg, jnp.float32), p, [0, .2, .4, .6, .8])(b)
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = jax.tree.map(lambda s: jnp.asarray(rng.integers(0, 100, s.shape), s.dtype), args[1])
    batch = batch.replace(mask=jnp.ones((b, p), bool), last=jnp.full((b,), p - 1, jnp.int32),
                          valid=jnp.ones((b,), bool))
    jax.block_until_ready((params, batch))
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    before = status("VmRSS:")
    jax.block_until_ready(compiled(params, batch))
    print(json.dumps({"measured": status("VmHWM:") - before,
                      "planned": m.temp_size_in_bytes + m.output_size_in_bytes}))
""")


def _measure(**cfg) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="65536")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cfg)], env=env,
                       capture_output=True, text=True, timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 15 s of CPU: one compile and run in a fresh process
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_planned_peak_within_25_percent_of_measured_gpt2_shaped():
  r = _measure(family="gpt2", d_model=128, n_layers=3, n_heads=4, d_head=32, d_mlp=512,
               d_vocab=512, n_ctx=256)
  assert r["measured"] > 50e6  # large enough that the process's own noise does not matter
  assert abs(r["planned"] - r["measured"]) <= 0.25 * r["measured"], r


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_planned_peak_within_25_percent_of_measured_llama_shaped():
  r = _measure(family="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_head=32,
               d_mlp=384, d_vocab=512, n_ctx=256, normalization="rmsnorm", positional="rotary",
               rotary_dim=32, gated_mlp=True, act_fn="silu", attn_bias=False,
               attn_out_bias=False, mlp_bias=False, tied_embeddings=False)
  assert r["measured"] > 50e6
  assert abs(r["planned"] - r["measured"]) <= 0.25 * r["measured"], r


@pytest.mark.parametrize("text,n", [("80GB", 80_000_000_000), ("80GiB", 80 * 2 ** 30),
                                    ("512 MB", 512_000_000), ("1.5g", 1_500_000_000),
                                    ("8e10", 80_000_000_000)])
def test_parse_bytes(text, n):
  assert MP.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["80XB", "", "-1GB", "GB", "0"])
def test_parse_bytes_refuses_in_one_line(text):
  with pytest.raises(MP.PlanError, match=r"^--device_memory=.*expected a positive size") as e:
    MP.parse_bytes(text)
  assert "\n" not in str(e.value)


def test_mesh_larger_than_the_devices_is_one_line():
  n = len(jax.devices())
  with pytest.raises(MP.PlanError, match=rf"--mesh={n + 1}x1: .*needs {n + 1} devices") as e:
    MP.parse_mesh(f"{n + 1}x1")
  assert "\n" not in str(e.value)
  with pytest.raises(MP.PlanError, match="expected DATAxMODEL"):
    MP.parse_mesh("two")


_SLOW = pytest.mark.slow  # tracing the init of 42 and 62 layers takes 5-10 s


@pytest.mark.parametrize("name,billions", [
    ("llama-3.1-8b", 8.03), ("gemma-2-2b", 2.61), pytest.param("gemma-2-9b", 9.24, marks=_SLOW),
    pytest.param("gemma-3-27b", 27.0, marks=_SLOW)])
def test_presets_have_the_models_parameter_counts(name, billions):
  cfg, dtype = MP.model_config(name)
  params = MP.abstract_params(cfg, dtype)  # shapes only: eval_shape, nothing allocated
  n = sum(x.size for x in jax.tree.leaves(params))
  assert abs(n / 1e9 - billions) < 0.02 * billions


def test_unknown_model_is_one_line(tmp_path):
  with pytest.raises(MP.PlanError, match="not a preset"):
    MP.model_config(str(tmp_path))


@pytest.mark.slow  # two compiles of a Gemma-2 kernel
def test_plan_of_a_config_dir_reads_only_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      dict(MP.PRESETS["gemma-2-2b"], num_hidden_layers=1, hidden_size=64, intermediate_size=128,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=256)))
  cfg, dtype = MP.model_config(str(tmp_path), "bfloat16")
  assert (cfg.family, cfg.n_layers, dtype) == ("gemma2", 1, jnp.bfloat16)
  params = MP.abstract_params(cfg, dtype)
  plan = MP.make_plan("test", PR.eap(cfg, params, 16, [0.0, 0.5]), 2,
                      MP.per_device_bytes(params), device_memory=MP.parse_bytes("1GB"))
  assert plan.params == MP.per_device_bytes(params) > 0
  assert plan.at.argument >= plan.params and plan.at.temp > 0
  assert plan.at2.peak > plan.at.peak and plan.per_row > 0
  assert plan.max_batch == int((1e9 - plan.fixed) // plan.per_row)
  text = MP.report(plan)
  assert "largest batch" in text and "fits" in text


@pytest.mark.slow  # the binary in a subprocess: imports and two compiles of the toy kernel
def test_find_circuit_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.find_circuit", "--dry_run", "--seq_len=8",
         "--batch_size=2", "--device_memory=1GB", f"--out={out}"]
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "memory plan" in r.stdout and "largest batch" in r.stdout
  assert not out.exists()
  bad = subprocess.run(cmd[:-2] + ["--device_memory=lots"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines() == [
      "find_circuit: error: --device_memory=lots: expected a positive size such as 80GB, 80GiB "
      "or 512MB"]


@pytest.mark.slow  # four compiles of a small kernel
def test_largest_batch_compiles_within_the_device_memory():
  cfg, dtype = MP.model_config("gemma-2-2b")
  cfg = dataclasses.replace(cfg, n_layers=2, d_model=64, d_mlp=128, n_heads=2, n_kv_heads=1,
                            d_head=32, rotary_dim=32, d_vocab=256)
  params = MP.abstract_params(cfg, jnp.float32)
  build = PR.eap(cfg, params, 32, [0.0, 0.5])
  plan = MP.make_plan("test", build, 2, MP.per_device_bytes(params), device_memory=int(50e6))
  n = plan.max_batch
  assert n > 4
  at_n = MP.compile_memory(*_unpack(build(n)))
  beyond = MP.compile_memory(*_unpack(build(n + 2)))
  assert at_n.peak <= 50e6 * 1.05 and beyond.peak > 50e6 * 0.95, (n, at_n, beyond)


def _unpack(built):
  fn, args = built
  return (fn, *args)


_TINY = dict(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=50,
             n_ctx=32)


@pytest.mark.parametrize("memory,scanned", [(int(80e9), True), (int(1e3), False)])
def test_exact_plan_lowers_the_kernel_the_run_uses(memory, scanned, monkeypatch):
  """`exact._exact_batch` reruns the edges with `edge_chunk_scan` when `scan_layers` (the stacked
  blocks fit the device), else `edge_chunk`: the plan lowers the same one for its device."""
  cfg = ModelConfig(**_TINY)
  called = []

  def spy(name, kernel):
    def run(*a, **k):
      called.append(name)
      return kernel(*a, **k)
    return run

  for name in ("edge_chunk_scan", "edge_chunk"):
    monkeypatch.setattr(X, name, spy(name, getattr(X, name)))
  fn, args = PR.exact(cfg, MP.abstract_params(cfg, jnp.float32), 8, device_memory=memory,
                      chunk=4)(2)
  out = jax.eval_shape(fn, *args)
  assert called == ["edge_chunk_scan" if scanned else "edge_chunk"]
  assert out[0].shape == (4,) and len(out) == (6 if scanned else 5)  # the stacked copy is live


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_eap_plan_with_a_memory_budget_has_smaller_temporaries():
  cfg = ModelConfig(**_TINY)
  params = MP.abstract_params(cfg, jnp.float32)
  alphas = [0.0, 0.5]
  free = MP.compile_memory(*_unpack(PR.eap(cfg, params, 16, alphas)(4)))
  capped = MP.compile_memory(*_unpack(PR.eap(cfg, params, 16, alphas, memory_budget="500kB")(4)))
  assert capped.temp < 0.6 * free.temp <= 500e3 / 0.6, (capped, free)
  assert capped.temp <= 500e3


def test_graph_plan_contracts_by_cell_chunks_as_the_run_does():
  """The attribution-graph plan runs `_rows` with the decoder entries grouped in (layer, position)
  cell chunks, as `attribute_graph` does, not the per-entry gather: far smaller temporaries."""
  cfg = ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
                    d_vocab=50, n_ctx=64)
  fn, args = GP.graph(cfg, MP.abstract_params(cfg, jnp.float32), 32, 64, jnp.float32)(8)
  writers = args[3]
  assert writers.cell_chunks is not None and writers.cell_chunks.one_per_node
  chunked = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  gather = jax.jit(fn).lower(*args[:3], writers.replace(cell_chunks=None),
                             *args[4:]).compile().memory_analysis().temp_size_in_bytes
  assert chunked * 4 < gather, (chunked, gather)


_DATA_SHARDS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxinterp import attribution as A, tasks
    from jaxinterp.attribution import contraction as C
    from jaxinterp.attribution import receiver_grads as RG
    from jaxinterp.models.config import ModelConfig
    from jaxinterp.models.transformer import init_params
    from jaxinterp.runtime import memory_plan as MP, memory_programs as PR, sharding

    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                      d_mlp=128, d_vocab=50, n_ctx=32, normalization="rmsnorm",
                      positional="rotary", rotary_dim=16, gated_mlp=True, mlp_bias=False,
                      act_fn="silu", attn_bias=False, attn_out_bias=False,
                      tied_embeddings=False)
    mesh = MP.parse_mesh("8x1")
    alphas = jnp.asarray(A.ig_alphas(3), jnp.float32)
    per_pos = (2 * (3 * 4 + 1) + 1) * 64 * 4
    cb = 2 * per_pos  # two positions per contraction chunk: many chunks, as at 8B scale
    params = MP.abstract_params(cfg, jnp.float32, mesh)
    temps = {}
    for shards in (1, 8):
      for b in (8, 16):
        fn = lambda p, x: RG.ig_inputs_batch(cfg, PR.TASK, p, x, PR.PATCHING, alphas,
                                             chunk_bytes=cb, data_shards=shards)
        c = jax.jit(fn).lower(params, MP.abstract_batch(b, 16, mesh)).compile()
        temps[shards, b] = c.memory_analysis().temp_size_in_bytes
        if b == 8:
          gathers = c.as_text().count("all-gather(")
          assert (gathers > 0) == (shards == 1), (shards, gathers)  # the whole batch gathered
    # per extra row of the global batch: 8 devices share it only with data_shards
    rows = {s: (temps[s, 16] - temps[s, 8]) / 8 for s in (1, 8)}
    assert rows[8] < 0.7 * rows[1], (rows, temps)
    # the scores: a batch sharded over 8 devices, data_shards from its sharding, as a run
    p = init_params(cfg, jax.random.PRNGKey(0))
    ds = tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0)
    batch = next(ds.batches(8))
    abl = A.Patching()
    ref = RG.ig_inputs_batch(cfg, ds.task, p, batch, abl, alphas, chunk_bytes=cb)[0]
    sb = sharding.shard_batch(batch, mesh)
    assert C.data_shards_of(sb.clean) == 8 and C.data_shards_of(batch.clean) == 1
    got = RG.ig_inputs_batch(cfg, ds.task, sharding.shard_params(p, mesh), sb, abl, alphas,
                             chunk_bytes=cb, data_shards=8)[0]
    ref, got = np.asarray(ref), np.asarray(got)
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    print("ok", rows)
""")


@pytest.mark.slow  # a fresh process on 8 simulated devices: 4 compiles and 2 runs (about 30 s)
@pytest.mark.by_hand  # CI's 30 minutes
def test_data_parallel_contraction_keeps_each_devices_rows():
  """On an 8x1 mesh the contraction's position chunks of the whole flattened batch made XLA
  all-gather every row's sender differences and gradients onto every device; with `data_shards`
  each device contracts its own rows: no all-gather, the per-row cost split 8 ways, the scores the
  single-device ones to float rounding."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _DATA_SHARDS], env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("ok")


@pytest.mark.slow  # four compiles of a 2-layer Llama-shaped EAP-IG kernel
def test_bf16_weights_are_not_copied_to_float32_for_the_whole_step_loop():
  """XLA:CPU has no bf16 matmul. Before `receiver_grads._per_step` it hoisted float32 copies of
  every bf16 block weight out of the IG steps' loop: here 1.57x the blocks' float32 bytes of
  batch-independent temporaries more than with float32 weights; 0.78x since (the MLP weights of
  one step). The blocks run layer by layer, as an 8B model's on an 80 GB device."""
  cfg = ModelConfig(family="llama", d_model=512, n_layers=2, n_heads=8, n_kv_heads=2, d_head=64,
                    d_mlp=1536, d_vocab=1000, n_ctx=128, normalization="rmsnorm",
                    positional="rotary", rotary_dim=64, gated_mlp=True, act_fn="silu",
                    attn_bias=False, attn_out_bias=False, mlp_bias=False, tied_embeddings=False)
  fixed = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    build = PR.eap(cfg, MP.abstract_params(cfg, dtype), 16, [0.5, 1.0], device_memory=10**6)
    temps = []
    for b in (2, 4):
      fn, args = build(b)
      temps.append(MP.compile_memory(fn, *args).temp)
    fixed[dtype] = 2 * temps[0] - temps[1]  # the temporaries less the rows' linear part
  params = MP.abstract_params(cfg, jnp.float32)
  blocks = 4 * sum(x.size for li in range(cfg.n_layers) for x in jax.tree.leaves(
      params[f"blocks_{li}"]))
  assert fixed[jnp.bfloat16] - fixed[jnp.float32] < blocks, (fixed, blocks)
