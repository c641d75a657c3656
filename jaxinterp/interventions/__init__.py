"""Interventions: pytrees of arrays that map a site's activation `x` to a new one, and what is built
on them (interchange training, DAS, steering, saving).

Each intervention is a `flax.struct.dataclass` with a `__call__(x) -> x'`. Pass them to the forward
as `interventions={"blocks.0.hook_resid_pre": Patch(value), ...}`. Their array fields are ordinary
traced arguments, so `jax.jit`, `jax.grad` and `jax.vmap` apply to them directly.

Modules:
- `basic`: selection (`Where`, `WhereEach`) and the simple interventions (`Patch`, `Zero`,
  `MeanAblate`, `Add`);
- `basis`: basis-aligned interchange, subtraction, noise, collection and sigmoid masks;
- `das`: rotated-space (distributed) interventions, DAS and its variants;
- `autoencoder`: SAEs and autoencoders at a site;
- `runner`: `Chain`, source collection and `run`, the forward with interventions;
- `interchange`: interchange interventions over a dataset of base/source pairs;
- `causal_model`: the high-level causal model whose variables DAS aligns;
- `training`: training interventions with optax (DAS, boundless DAS, masks) and IIA;
- `saving`: saving and loading trained interventions (orbax arrays plus a JSON spec);
- `steering`: steering vectors and cross-model patches;
- `illusion`: the interpretability-illusion diagnostic for a learned subspace;
- `toy_task`: DAS on a toy model whose intermediate variable is known (the shipped `das_toy`, its
  task and causal model, and `train_das`, experiments/train_das.py's pipeline; not imported here).
"""

from jaxinterp.interventions import (
  autoencoder,
  basic,
  basis,
  causal_model,
  das,
  illusion,
  interchange,
  runner,
  saving,
  steering,
  training,
)
from jaxinterp.interventions.autoencoder import Autoencoder
from jaxinterp.interventions.basic import (
  ALL,
  Add,
  IndexLike,
  InterventionError,
  MeanAblate,
  Patch,
  Where,
  WhereEach,
  Zero,
  orthogonalize,
)
from jaxinterp.interventions.basis import Collect, GaussianNoise, Interchange, SigmoidMask, Subtract
from jaxinterp.interventions.das import (
  BoundlessRotatedSpace,
  LowRankRotatedSpace,
  RotatedSpace,
  SigmoidMaskRotatedSpace,
  sigmoid_boundary,
)
from jaxinterp.interventions.runner import (
  INTERVENTION_TYPES,
  Chain,
  collect_sources,
  run,
  with_sources,
)

__all__ = [
    "ALL", "Add", "Autoencoder", "BoundlessRotatedSpace", "Chain", "Collect", "GaussianNoise",
    "INTERVENTION_TYPES", "IndexLike", "Interchange", "InterventionError", "LowRankRotatedSpace",
    "MeanAblate", "Patch", "RotatedSpace", "SigmoidMask", "SigmoidMaskRotatedSpace", "Subtract",
    "Where", "WhereEach", "Zero", "collect_sources", "orthogonalize", "sigmoid_boundary",
    "with_sources", "autoencoder", "basic", "basis", "causal_model", "das", "illusion",
    "interchange", "run", "runner", "saving", "steering", "training",
]
