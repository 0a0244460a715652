"""Device mesh, logical-axis rules, shardings and multi-host initialisation.

Mesh axes: ('data', 'fsdp', 'tensor'). The batch is sharded over data×fsdp; parameters over fsdp
(ZeRO-3 style) and tensor (Megatron style) according to one rules table keyed by parameter name.
A dimension that is not divisible by its mesh axis is left unsharded on that axis, so every model
size runs on every mesh (GSPMD inserts the collectives).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
# Batch rows are split over fsdp-major then data. (With ('data', 'fsdp') XLA's SPMD partitioner
# computed wrong weight gradients on a 2x2x2 CPU mesh with 2-D sharded weights, jax 0.10.2;
# tests/test_pretrain.py::test_sharded_step_equals_single_device guards this.)
BATCH_AXES = ('fsdp', 'data')

# Logical axis names -> mesh axis (the one rules table).
LOGICAL_RULES = {
    'batch': BATCH_AXES,
    'embed': 'fsdp',      # the model dimension of weight matrices
    'mlp': 'tensor',      # column-parallel output / row-parallel input
    'heads': 'tensor',
    'vocab': 'tensor',
    'cond': None,
    'norm': None,
}


def logical_axes(path: tuple, ndim: int) -> tuple:
  """Logical axes of a parameter given its tree path (names mirror the official model)."""
  names = [str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p)))) for p in path]
  if names and names[-1] == 'value':       # nnx.Variable's pytree child
    names = names[:-1]
  leaf = names[-1] if names else ''
  parent = names[-2] if len(names) > 1 else ''
  if ndim == 0:
    return ()
  if 'sigma_map' in names or parent in ('main_0', 'main_2') or leaf in ('u', 'v'):
    return (None,) * ndim                      # small: replicate
  if leaf == 'embedding' or (leaf == 'embedding' and parent == 'vocab_embed'):
    return ('vocab', 'embed')
  if leaf in ('wte', 'wpe'):
    return (None, 'embed')
  if leaf == 'kernel' and ndim == 2:
    if parent == 'adaLN_modulation':
      return ('cond', 'mlp')
    if parent in ('attn_out', 'mlp_2', 'c_proj', 'o_proj', 'down_proj'):
      return ('mlp', 'embed')                   # row-parallel
    if parent == 'linear':
      # Output projection: vocab-parallel only. Sharding its model dim over fsdp as well gave
      # wrong input gradients on a (2 data, 2 fsdp, 2 tensor) CPU mesh (XLA SPMD, jax 0.10.2);
      # tests/test_pretrain.py guards this.
      return (None, 'vocab')
    return ('embed', 'mlp')                     # column-parallel (qkv, mlp_0, ...)
  if leaf == 'bias' and ndim == 1:
    if parent in ('attn_out', 'mlp_2', 'c_proj'):
      return (None,)
    if parent == 'linear':
      return ('vocab',)
    return ('mlp',)
  return (None,) * ndim


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [int(mesh_cfg[a]) for a in AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices: '
                       'choose mesh.fsdp/mesh.tensor that divide the device count')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) > num_devices:
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but '
                     f'{num_devices} are present: set --config.mesh.data=-1 or sizes whose '
                     'product is the device count')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  used = int(np.prod(shape))
  if used < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f'mesh {dict(zip(AXES, shape))} uses {used} of {len(devices)} devices: '
                       'multi-host runs must use every device (set one mesh axis to -1)')
    logging.warning('mesh %s uses %d of %d devices', dict(zip(AXES, shape)), used, len(devices))
    devices = devices[:used]
  slices = num_slices(devices)
  if slices > 1:
    return Mesh(_multislice_device_mesh(shape, devices, slices), AXES)
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, AXES)


def num_slices(devices) -> int:
  """TPU slices joined over the data-centre network (multi-slice); 1 elsewhere."""
  if not devices or getattr(devices[0], 'platform', '') != 'tpu':
    return 1
  return len({int(getattr(d, 'slice_index', 0) or 0) for d in devices})


def _multislice_device_mesh(shape, devices, slices: int) -> np.ndarray:
  """Multi-slice: the `data` axis is split slices × per-slice (the slow DCN link carries only
  the data-parallel gradient all-reduce); fsdp and tensor stay inside a slice."""
  if shape[0] % slices:
    raise ValueError(f'mesh {dict(zip(AXES, shape))} on {slices} TPU slices: mesh.data must be a '
                     f'multiple of the slice count {slices} (fsdp and tensor stay inside a slice)')
  return mesh_utils.create_hybrid_device_mesh(
      (shape[0] // slices, shape[1], shape[2]), (slices, 1, 1), devices=devices)


def _mesh_axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  if isinstance(axis, tuple):
    return int(np.prod([mesh.shape[a] for a in axis]))
  return mesh.shape[axis]


def spec_for(path, shape, mesh: Mesh) -> P:
  axes = logical_axes(path, len(shape))
  out = []
  for dim, logical in zip(shape, axes):
    mesh_axis = LOGICAL_RULES.get(logical) if logical else None
    if mesh_axis is not None and dim % _mesh_axis_size(mesh, mesh_axis) == 0 \
        and _mesh_axis_size(mesh, mesh_axis) > 1:
      out.append(mesh_axis)
    else:
      out.append(None)
  return P(*out)


def param_shardings(mesh: Mesh, tree: Any):
  """NamedShardings for a parameter pytree (arrays or ShapeDtypeStructs)."""
  def one(path, x):
    shape = getattr(x, 'shape', ())
    return NamedSharding(mesh, spec_for(path, shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(mesh: Mesh, tree: Any):
  return jax.device_put(tree, param_shardings(mesh, tree))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return _mesh_axis_size(mesh, BATCH_AXES)


def global_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """The GLOBAL batch (identical on every host: data iterators are deterministic) as one
  data-sharded jax.Array; each host transfers only the rows its devices hold, whatever the
  device layout of the mesh."""
  sharding = batch_sharding(mesh, batch.ndim)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


def maybe_initialize_distributed() -> None:
  """Multi-host init: TPU pods (auto-detected), SLURM, or explicit env vars.

  Explicit: DIDI_COORDINATOR=host:port, DIDI_NUM_PROCESSES, DIDI_PROCESS_ID. Under SLURM with
  more than one task, jax's cluster auto-detection is used. Single-process runs do nothing.
  """
  # With one task per node, jax's SLURM detection would give each process only GPU
  # SLURM_LOCALID: DIDI_LOCAL_DEVICE_IDS=0,1,...,7 (or JAX_LOCAL_DEVICE_IDS) hands it all of them.
  ids = os.environ.get('DIDI_LOCAL_DEVICE_IDS') or os.environ.get('JAX_LOCAL_DEVICE_IDS')
  local_ids = [int(x) for x in ids.split(',')] if ids else None
  if os.environ.get('DIDI_COORDINATOR'):
    jax.distributed.initialize(
        coordinator_address=os.environ['DIDI_COORDINATOR'],
        num_processes=int(os.environ['DIDI_NUM_PROCESSES']),
        process_id=int(os.environ['DIDI_PROCESS_ID']), local_device_ids=local_ids)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or os.environ.get('TPU_WORKER_HOSTNAMES') \
      or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(local_device_ids=local_ids)
  else:
    return
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
