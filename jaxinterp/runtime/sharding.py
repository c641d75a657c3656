"""Device meshes: data parallel over the batch, tensor parallel over heads and MLP columns.

A 2-D mesh with axes ("data", "model"). `shard_params` places the weights with `NamedSharding`s:
the heads axis of W_Q/W_K/W_V/W_O and b_Q/b_K/b_V, the MLP columns of W_in/W_gate/b_in and the rows
of W_out on "model" (Megatron-style), everything else (embeddings, norms, output biases)
replicated. `shard_batch` puts the leading (batch) axis of every array of a `Batch` on "data". The
jitted kernels are unchanged: `jit` propagates the input shardings through the program (GSPMD) and
inserts the all-reduces after W_O and W_out and the reductions of the edge scores over "data".

    mesh = make_mesh(n_data=2, n_model=4)
    params = shard_params(params, mesh)
    scores = attribute(cfg, params, ds, batch_fn=lambda b: shard_batch(b, mesh)).scores

A leaf whose sharded axis is not divisible by the mesh's "model" size (e.g. 8 KV heads on 16-way
model parallelism, or a GQA model's 2 KV heads on 4-way) is replicated instead; the batch size must
be a multiple of the "data" size. The rules go by parameter name, so they cover every family the
decoder configures (GPT-2, NeoX, Llama, Gemma-2/3, Qwen3, Mistral, OLMo-2, Phi-3): the names
above are the only ones with a heads or MLP axis, and the rest (norms, qk-norms, embeddings,
output biases) are replicated.

FSDP (`shard_params(..., fsdp=True)`, the binaries' `--fsdp`): every weight matrix is also split
over "data", on its largest axis not already on "model" that the "data" size divides (W_E's
vocabulary rows, W_Q's d_model rows, ...), so a device holds 1 / (data x model) of each matrix
instead of 1 / model. `jit` gathers each weight where a layer uses it; the scores are the same.

Multi-host (several processes, e.g. a TPU pod slice or GPU nodes; `runtime.distributed`): the
binaries start `jax.distributed` from `--coordinator_address`, `--num_processes` and
`--process_id` (or the environment), and attribution splits the batches over the processes (each
scores whole batches of its own and the partial sums merge after every round), so a mesh is
per process: `make_mesh` builds it over this process's devices (`jax.local_devices()`), "model"
within a host where the interconnect is fast and "data" over its devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinterp.tasks import Batch

DATA, MODEL = "data", "model"

# Parameter name -> which axis goes on "model".
_HEAD_AXIS0 = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
_MLP_COLUMNS = ("W_in", "W_gate")  # [d_model, d_mlp]: axis 1
_MLP_VECTOR = ("b_in",)  # [d_mlp]: axis 0
_MLP_ROWS = ("W_out",)  # [d_mlp, d_model]: axis 0


class ShardingError(ValueError):
  """A mesh that does not fit the devices, or a batch that does not split over it."""


def make_mesh(n_data: int, n_model: int, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "model") mesh of n_data x n_model devices (default: the first of
  `jax.devices()`, or of this process's `jax.local_devices()` in a multi-process run)."""
  if devices is None:
    devices = jax.local_devices() if jax.process_count() > 1 else jax.devices()
  devices = list(devices)
  if n_data < 1 or n_model < 1:
    raise ShardingError(f"mesh sizes must be positive, got n_data={n_data}, n_model={n_model}")
  if n_data * n_model > len(devices):
    where = " to this process" if jax.process_count() > 1 else ""
    raise ShardingError(f"a {n_data}x{n_model} mesh needs {n_data * n_model} devices, only "
                        f"{len(devices)} are visible{where} (on CPU, set XLA_FLAGS="
                        f"--xla_force_host_platform_device_count=N before importing jax)")
  grid = np.array(devices[:n_data * n_model], dtype=object).reshape(n_data, n_model)
  return Mesh(grid, (DATA, MODEL))


def param_spec(path: tuple, x, n_model: int, n_data: int = 1) -> P:
  """The PartitionSpec of one parameter leaf (by its last key): its heads or MLP axis on "model"
  (replicated if the axis does not divide), and with `n_data` > 1 (FSDP) a matrix's largest other
  axis that `n_data` divides on "data"."""
  name = str(getattr(path[-1], "key", path[-1])) if path else ""
  axis = None
  if name in _HEAD_AXIS0 or name in _MLP_VECTOR or name in _MLP_ROWS:
    axis = 0
  elif name in _MLP_COLUMNS:
    axis = 1
  spec = [None] * x.ndim
  if axis is not None and x.ndim > axis and x.shape[axis] % n_model == 0:
    spec[axis] = MODEL
  if n_data > 1 and x.ndim >= 2:
    free = [a for a in range(x.ndim) if spec[a] is None and x.shape[a] % n_data == 0]
    if free:
      spec[max(free, key=lambda a: (x.shape[a], -a))] = DATA
  return P(*spec) if any(spec) else P()


def shard_params(params, mesh: Mesh, fsdp: bool = False):
  """Place params on the mesh: heads and MLP columns on "model", everything else replicated; with
  `fsdp`, each matrix also split over "data" (`param_spec`)."""
  n_model, n_data = mesh.shape[MODEL], (mesh.shape[DATA] if fsdp else 1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.device_put(x, NamedSharding(mesh, param_spec(path, x, n_model, n_data))),
      params)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
  """Put the leading (batch) axis of every array in `batch` on "data" (replicated over "model")."""
  n_data = mesh.shape[DATA]
  rows = batch.clean.shape[0]
  if rows % n_data:
    raise ShardingError(f"batch size {rows} is not a multiple of the mesh's data axis ({n_data}); "
                        f"choose batch_size as a multiple of {n_data}")

  def put(x):
    spec = P(DATA, *([None] * (x.ndim - 1))) if x.ndim else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, batch)
