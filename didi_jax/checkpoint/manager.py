"""Every job saves through this orbax CheckpointManager wrapper.

A checkpoint step holds three items: `state` (the array pytree: params, EMA, optimiser states,
spectral vectors, step), `data` (the data iterator's JSON state) and `meta` (JSON: job, config
summary, teacher source, run seed). Saves are asynchronous with keep-N; restore goes into an
abstract (optionally sharded) target so parameters come back already laid out on the mesh.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from didi_jax import errors


CheckpointError = errors.CheckpointError


class _QuietOrbax(logging.Filter):
  """Drops orbax's notice that checkpoint items we did not ask for were not restored (we
  restore items selectively on purpose: a notice per item is noise in every command)."""

  def filter(self, record):
    return 'could not be restored' not in record.getMessage()


for _name in ('absl', 'orbax', ''):
  if not any(isinstance(f, _QuietOrbax) for f in logging.getLogger(_name).filters):
    logging.getLogger(_name).addFilter(_QuietOrbax())


class Manager:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               every: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    self.every = every
    self._stored_keys: dict[int, set] = {}   # a written step's keys never change

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data: Optional[dict] = None,
           meta: Optional[dict] = None, force: bool = True) -> bool:
    items = {'state': ocp.args.StandardSave(flatten(state)),
             'data': ocp.args.JsonSave(data or {}),
             'meta': ocp.args.JsonSave(meta or {})}
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores (state, data, meta); `target` is a pytree of arrays or ShapeDtypeStructs with
    shardings. Raises CheckpointError with the fix when shapes or structure disagree."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(_abstract, flatten(target))
    stored = self.stored_keys(step)
    if stored is not None:
      missing = sorted(set(abstract) - stored)
      unexpected = sorted(stored - set(abstract))
      if missing or unexpected:
        raise CheckpointError(
            f'checkpoint {self.directory}/{step} does not match this config: missing '
            f'{missing[:6]}{"..." if len(missing) > 6 else ""}, unexpected '
            f'{unexpected[:6]}{"..." if len(unexpected) > 6 else ""}: use the config it was '
            'written with (see its meta), or a fresh --workdir')
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} does not match this config ({_short(e)}): '
          'use the config it was written with (see its meta), or a fresh --workdir') from e
    return unflatten(target, out['state']), out['data'], out['meta']

  def restore_subset(self, flat_target: dict, step: Optional[int] = None) -> dict:
    """Restores only the flat keys of `flat_target` ({'ema.blocks.0.x': ShapeDtypeStruct}) from
    the state of `step` (default: latest) as host NumPy arrays: loading one network reads nothing
    else, and needs no knowledge of the optimiser or the rest of the train state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    stored = self.stored_keys(step)
    missing = sorted(set(flat_target) - (stored or set()))
    if missing:
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} lacks {missing[:4]}'
          f'{"..." if len(missing) > 4 else ""}: it was written for another model config')
    # Host NumPy values: every process reads the whole network, and the caller places it on its
    # mesh (a single-device array could not be device_put across hosts).
    abstract = {k: _abstract(v) for k, v in flat_target.items()}
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype)
                    for k, v in abstract.items()}
    path = os.path.join(self.directory, str(step), 'state')
    try:
      with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f'checkpoint {self.directory}/{step} does not match this model '
                            f'config ({_short(e)})') from e

  def stored_keys(self, step: int) -> Optional[set]:
    """The flat keys of the state stored at `step` (None if its metadata cannot be read)."""
    if step in self._stored_keys:
      return self._stored_keys[step]
    try:
      meta = self._mngr.item_metadata(step)
      tree = meta['state'] if 'state' in meta else None
      if tree is None:   # the item's handler is not registered yet: read the tree metadata
        absl_logger = logging.getLogger('absl')
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)   # "Metadata file does not exist": expected here
        try:
          with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(os.path.join(self.directory, str(step), 'state')).item_metadata
        finally:
          absl_logger.setLevel(level)
      if tree is None:
        return None
      self._stored_keys[step] = set(tree.keys())
      return self._stored_keys[step]
    except Exception:  # pylint: disable=broad-except
      return None

  def read_meta(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), 'meta', 'metadata')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        return json.load(f)
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out['meta']

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def _key_str(path) -> str:
  out = []
  for p in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(p, attr):
        out.append(str(getattr(p, attr)))
        break
    else:
      out.append(str(p))
  if len(out) > 1 and out[-1] == 'value':  # nnx.Variable's pytree child
    out = out[:-1]
  return '.'.join(out)


def flatten(tree: Any) -> dict:
  """A pytree (nnx.State, optax states, dicts) as a flat {'a.b.0.kernel': array} dict."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {}
  for path, leaf in leaves:
    key = _key_str(path)
    if key in flat:
      raise CheckpointError(f'duplicate checkpoint key {key!r}')
    flat[key] = leaf
  return flat


def unflatten(target: Any, flat: dict) -> Any:
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree_util.tree_unflatten(treedef, [flat[_key_str(p)] for p, _ in paths])


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))


def _short(e: Exception) -> str:
  s = str(e).strip().splitlines()
  return (s[0] if s else type(e).__name__)[:300]
