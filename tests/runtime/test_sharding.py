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
