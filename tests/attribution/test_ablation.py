"""The ablation types (`attribution.ablation`): one pytree per intervention, each with its own
`values`, told apart by jit and by pytree structure, and built by `make_ablation` by name."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.models import edges as E
from jaxinterp.models.transformer import sender_outputs
from tests.attribution.test_receiver_grads import CONFIGS, _params

CFG = CONFIGS["gpt2"]  # learned positions: "zero" keeps the position embedding


@pytest.fixture(scope="module")
def setup():
  params = _params(CFG)
  ds = tasks.make_induction(6, 4, CFG.d_vocab, seed=0, bos_id=0)
  return params, ds, next(ds.batches(4))


def test_make_ablation_builds_each_type_by_name(setup):
  params, ds, _ = setup
  types = {"patching": A.Patching, "zero": A.Zero, "zero-all": A.ZeroAll, "mean": A.Mean,
           "mean-positional": A.MeanPositional}
  assert set(types) | {"optimal"} == set(A.INTERVENTIONS)
  for name, cls in types.items():
    abl = A.make_ablation(CFG, params, ds, name, 4)
    assert type(abl) is cls and abl.kind == name
  with pytest.raises(A.AttributionError, match="unknown intervention 'ones'"):
    A.make_ablation(CFG, params, ds, "ones", 4)


def test_each_type_gives_its_own_values(setup):
  params, ds, batch = setup
  B, P = batch.clean.shape
  shape = (B, P, E.n_senders(CFG), CFG.d_model)
  corrupted = sender_outputs(CFG, params, batch.corrupted, batch.mask)
  np.testing.assert_array_equal(A.Patching().values(CFG, params, batch), corrupted)
  np.testing.assert_array_equal(A.ZeroAll().values(CFG, params, batch), np.zeros(shape))
  zero = np.asarray(A.Zero().values(CFG, params, batch))
  assert not zero[:, :, 1:].any()  # every sender but the input node: zero
  pos = np.asarray(params["W_pos"])[: P]  # right padding: row positions are 0..P-1
  np.testing.assert_array_equal(zero[0, :, 0], pos)  # the input node keeps W_pos, as EAP-IG's
  means = jax.random.normal(jax.random.PRNGKey(0), shape[2:])
  np.testing.assert_array_equal(A.Mean(means).values(CFG, params, batch),
                                np.broadcast_to(means, shape))
  np.testing.assert_array_equal(A.Optimal(means).values(CFG, params, batch),
                                np.broadcast_to(means, shape))
  short = jax.random.normal(jax.random.PRNGKey(1), (P - 2,) + shape[2:])
  positional = np.asarray(A.MeanPositional(short).values(CFG, params, batch))
  np.testing.assert_array_equal(positional[:, : P - 2], np.broadcast_to(short, (B,) + short.shape))
  assert not positional[:, P - 2:].any()  # past the means' length: zero


def test_types_are_told_apart_by_structure_and_by_jit(setup):
  """JAX compares the structures of two dataclass types with the same fields as equal; `kind`, as
  static metadata, keeps them apart, so a jitted function never reuses one type's trace for
  another."""
  params, _, batch = setup
  x = jnp.zeros((E.n_senders(CFG), CFG.d_model))
  every = [A.Patching(), A.Zero(), A.ZeroAll(), A.Mean(x), A.MeanPositional(x[None]),
           A.Optimal(x)]
  for a, b in itertools.combinations(every, 2):
    assert jax.tree.structure(a) != jax.tree.structure(b), (a.kind, b.kind)
  total = jax.jit(lambda abl: abl.values(CFG, params, batch).sum())
  assert float(total(A.Zero())) != float(total(A.ZeroAll()))  # W_pos is not zero
  assert float(total(A.ZeroAll())) == 0.0
  assert float(total(A.Patching())) != float(total(A.Zero()))


def test_kind_is_the_types_own():
  with pytest.raises(A.AttributionError, match="Patching is the 'patching' ablation, not 'zero'"):
    A.Patching(kind="zero")
  assert A.Mean(jnp.zeros(2)).replace(means=jnp.ones(2)).kind == "mean"
