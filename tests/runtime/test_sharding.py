"""Sharded attribution equals single-device attribution, on 8 simulated CPU devices.

XLA_FLAGS must be set before jax initialises, so the check runs in a fresh subprocess.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from jaxinterp import models
    from jaxinterp import attribution as A, tasks
    from jaxinterp.runtime import sharding as SH

    cfg = models.ModelConfig(family="llama", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
                             d_vocab=50, n_ctx=32, n_kv_heads=2, normalization="rmsnorm",
                             positional="rotary", rotary_dim=8, gated_mlp=True, mlp_bias=False,
                             act_fn="silu", attn_bias=False, attn_out_bias=False,
                             tied_embeddings=False)
    params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x,
                          models.init_params(cfg, jax.random.PRNGKey(0)))
    ds = tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0)

    mesh = SH.make_mesh(2, 4)
    sp = SH.shard_params(params, mesh)
    wq = sp["blocks_0"]["attn"]["W_Q"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("model", None, None), wq.sharding
    assert len({s.device for s in wq.addressable_shards}) == 8
    assert wq.addressable_shards[0].data.shape == (1, 32, 8)
    assert sp["blocks_0"]["mlp"]["W_out"].addressable_shards[0].data.shape == (16, 32)
    assert sp["W_E"].sharding.spec == jax.sharding.PartitionSpec()
    b = SH.shard_batch(next(ds.batches(4)), mesh)
    assert b.clean.addressable_shards[0].data.shape[0] == 2

    # Data + tensor parallel (batches on "data", heads and MLP columns on "model").
    ref = A.attribute(cfg, params, ds, ig_steps=3, batch_size=4, quiet=True).scores
    got = A.attribute(cfg, sp, ds, ig_steps=3, batch_size=4, quiet=True,
                      batch_fn=lambda b: SH.shard_batch(b, mesh)).scores
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    # Tensor parallel through the public attribute() (params sharded, batches replicated).
    ref2 = A.attribute(cfg, params, ds, method="EAP", batch_size=4, quiet=True).scores
    got2 = A.attribute(cfg, sp, ds, method="EAP", batch_size=4, quiet=True).scores
    np.testing.assert_allclose(got2, ref2, rtol=1e-4, atol=1e-5 * np.abs(ref2).max())

    # FSDP: each matrix also split over "data"; the GQA model's 2 KV heads do not divide 4-way
    # model parallelism, so W_K/W_V are split over "data" only.
    fp = SH.shard_params(params, mesh, fsdp=True)
    P = jax.sharding.PartitionSpec
    assert fp["blocks_0"]["attn"]["W_Q"].sharding.spec == P("model", "data", None)
    assert fp["blocks_0"]["attn"]["W_K"].sharding.spec == P(None, "data", None)
    assert fp["W_E"].sharding.spec == P("data", None)  # [vocab 50, d_model 32]: the larger axis
    assert fp["blocks_0"]["ln1"]["w"].sharding.spec == P()  # vectors stay replicated
    got3 = A.attribute(cfg, fp, ds, ig_steps=3, batch_size=4, quiet=True,
                       batch_fn=lambda b: SH.shard_batch(b, mesh)).scores
    np.testing.assert_allclose(got3, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    try:
      SH.shard_batch(next(ds.batches(3)), mesh)
    except SH.ShardingError as e:
      assert "multiple of" in str(e)
    else:
      raise AssertionError("an odd batch must be refused")
    print("SHARDING-OK")
""")


@pytest.mark.slow
def test_sharded_scores_equal_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _CHECK], cwd=str(REPO), env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0 and "SHARDING-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


def test_make_mesh_refuses_too_many_devices():
  from jaxinterp.runtime import sharding as SH
  with pytest.raises(SH.ShardingError, match="devices"):
    SH.make_mesh(64, 64)


def test_param_spec_rules():
  """Heads and MLP columns on "model" where they divide; with FSDP the largest other axis of a
  matrix that divides on "data"; vectors replicated."""
  from jax.sharding import PartitionSpec as P

  from jaxinterp.runtime import sharding as SH

  class Leaf:
    def __init__(self, *shape):
      self.shape, self.ndim = shape, len(shape)

  def spec(name, *shape, n_model=4, n_data=1):
    return SH.param_spec((name,), Leaf(*shape), n_model, n_data)

  assert spec("W_Q", 8, 32, 8) == P("model", None, None)
  assert spec("W_K", 2, 32, 8) == P()  # 2 KV heads on 4-way model parallelism: replicated
  assert spec("W_in", 32, 64) == P(None, "model")
  assert spec("W_out", 64, 32) == P("model", None)
  assert spec("W_E", 50, 32) == P()
  assert spec("W_Q", 8, 32, 8, n_data=2) == P("model", "data", None)
  assert spec("W_K", 2, 32, 8, n_data=2) == P(None, "data", None)
  assert spec("W_out", 64, 32, n_data=2) == P("model", "data")
  assert spec("W_E", 50, 32, n_data=2) == P("data", None)
  assert spec("W_E", 50, 32, n_data=4) == P(None, "data")  # 50 does not split 4-way
  assert spec("W_E", 50, 30, n_data=4) == P()  # nothing divides: replicated
  assert spec("b_in", 64, n_data=2) == P("model")  # vectors: never on "data"
  assert spec("w", 32, n_data=2) == P()


_FAMILIES_CHECK = textwrap.dedent("""
    import sys
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from jaxinterp import attribution as A, tasks
    from jaxinterp.runtime import sharding as SH
    from tests.attribution.test_receiver_grads import CONFIGS as BASE, _params
    from tests.models.test_family_methods import CONFIGS as NEW, _params as new_params

    mesh = SH.make_mesh(2, 4)
    for family in sys.argv[1:]:
      cfg = BASE[family] if family in BASE else NEW[family]
      params = _params(cfg) if family in BASE else new_params(family)
      ds = tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0)
      ref = A.attribute(cfg, params, ds, ig_steps=3, batch_size=4, quiet=True).scores
      for fsdp in (False, True):
        got = A.attribute(cfg, SH.shard_params(params, mesh, fsdp=fsdp), ds, ig_steps=3,
                          batch_size=4, quiet=True,
                          batch_fn=lambda b: SH.shard_batch(b, mesh)).scores
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=f"{family} fsdp={fsdp}")
      print(family, "OK", flush=True)
    print("FAMILIES-OK")
""")


@pytest.mark.slow
@pytest.mark.families_matrix  # by hand: see pyproject.toml
def test_sharded_scores_equal_single_device_every_family():
  """On a 2x4 mesh, with and without FSDP, EAP-IG's scores equal one device's for every family the
  decoder configures (GQA with fewer KV heads than model shards among them)."""
  families = ["gpt2", "gpt_neox", "gemma2", "gemma3", "qwen3", "mistral", "olmo2", "phi3"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _FAMILIES_CHECK, *families], cwd=str(REPO), env=env,
                     capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0 and "FAMILIES-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
