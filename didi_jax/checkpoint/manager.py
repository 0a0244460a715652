"""Every job saves through this orbax CheckpointManager wrapper.

A checkpoint step holds three items: `state` (the array pytree: params, EMA, optimiser states,
spectral vectors, step), `data` (the data iterator's JSON state) and `meta` (JSON: job, config
summary, teacher source, run seed). Saves are asynchronous with keep-N; restore goes into an
abstract (optionally sharded) target so parameters come back already laid out on the mesh.

A bad day ends in one line, with nothing lost:
* a full disk (or quota) during a save raises `errors.DiskFullError` naming the step that could
  not be written and the newest intact one; the partial step is removed, and running the same
  command again resumes from the intact step;
* a damaged step (a data file truncated or overwritten, unreadable metadata) is named, and
  `restore` goes on to the newest intact step with a warning; the damaged step is moved aside to
  `<checkpoints>.damaged/` once an older step has restored (so the run can write that step again).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from didi_jax import errors


CheckpointError = errors.CheckpointError
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ('No space left on device', 'Disk quota exceeded', 'ENOSPC', 'EDQUOT')
_AFTER_FAILED_SAVE = ('cannot schedule new futures after shutdown', 'Save Finalize thread',
                      'Handler Commit operations', '_SignalingThread.run() raised',
                      # asyncio: the failed save's other writers, whose files were removed
                      'exception was never retrieved', 'Error writing')
_SAVE_FAILED = {'seen': False}   # set once a save ran out of space: its echoes are dropped


class CheckpointDamaged(CheckpointError):
  """A checkpoint step whose files cannot be read (truncated, overwritten, missing)."""


def no_space(e: BaseException) -> bool:
  """Whether `e` (or an exception in its chain) is a full disk or an exceeded quota."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


class _QuietOrbax(logging.Filter):
  """Drops orbax's notice that checkpoint items we did not ask for were not restored (we
  restore items selectively on purpose: a notice per item is noise in every command), and the
  background threads' tracebacks of a save that ran out of space (the job says it in one line)."""

  def filter(self, record):
    message = record.getMessage()
    if 'could not be restored' in message:
      return False
    if record.exc_info and record.exc_info[1] is not None and no_space(record.exc_info[1]):
      _SAVE_FAILED['seen'] = True
      return False
    if any(t in message for t in _NO_SPACE_TEXT):
      _SAVE_FAILED['seen'] = True
      return False
    return not (_SAVE_FAILED['seen'] and any(t in message for t in _AFTER_FAILED_SAVE))


def _drop_closed_loop_echo(previous):
  """tensorstore's callbacks into a finished asyncio loop (reading a damaged checkpoint) end in
  an unraisable "Event loop is closed" traceback that says nothing: drop exactly that."""

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)
  hook.didi_quiet = True
  return hook


if not getattr(sys.unraisablehook, 'didi_quiet', False):
  sys.unraisablehook = _drop_closed_loop_echo(sys.unraisablehook)

for _name in ('absl', 'orbax', 'asyncio', ''):
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
    self._stored_shapes: dict[int, dict] = {}
    self._in_flight: Optional[int] = None    # the step an asynchronous save is writing
    self._unfinished: list = []              # steps whose save ran out of space

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data: Optional[dict] = None,
           meta: Optional[dict] = None, force: bool = True) -> bool:
    """Saves `step` (asynchronously when so built). A full disk, here or in the previous step's
    background write, raises DiskFullError (one line; see the module docstring)."""
    items = {'state': ocp.args.StandardSave(flatten(state)),
             'data': ocp.args.JsonSave(data or {}),
             'meta': ocp.args.JsonSave(meta or {})}
    with self._space_errors(step):
      saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
      self._in_flight = step
    return saved

  @contextlib.contextmanager
  def _space_errors(self, step: Optional[int] = None):
    """Turns a full disk in the body (or in the background write it waits for) into one
    DiskFullError line naming the step not written and the newest intact one."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not no_space(e):
        raise
      _SAVE_FAILED['seen'] = True
      failed = [s for s in (self._in_flight, step) if s is not None]
      self._in_flight = None
      self._unfinished += failed
      self._remove_unfinished()
      self._reload()
      done = set(self.all_steps())
      lost = [s for s in failed if s not in done]
      intact = max(done - set(lost), default=None)
      what = f'step {min(lost)}' if lost else 'a checkpoint'
      kept = (f'step {intact} in {self.directory} is intact' if intact is not None else
              'no earlier step was written')
      raise errors.DiskFullError(
          f'no space left on the device while saving {what} to {self.directory}: {kept}; free '
          'space and run the same command (it resumes from there)') from None

  def _remove_unfinished(self, steps=None):
    """Frees the space of steps whose save did not finish (orbax's temporary directories)."""
    for s in (self._unfinished if steps is None else steps):
      for tmp in glob.glob(os.path.join(self.directory, f'{s}.orbax-checkpoint-tmp*')):
        shutil.rmtree(tmp, ignore_errors=True)

  def remove_unfinished_saves(self):
    """Removes what saves cut short (a full disk, a kill) left behind; for the one process that
    writes this directory, at its start (a reader must not: a save may be under way)."""
    if jax.process_index() == 0:
      self._remove_unfinished(['[0-9]*'])

  def _reload(self):
    try:
      self._mngr.reload()
    except Exception:  # pylint: disable=broad-except
      pass

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores (state, data, meta); `target` is a pytree of arrays or ShapeDtypeStructs with
    shardings. Raises CheckpointError with the fix when shapes or structure disagree. Without
    `step`, a damaged newest step is named and the newest intact one restored (module doc)."""
    abstract = jax.tree.map(_abstract, flatten(target))

    def read(s):
      self._check_matches(s, abstract)
      try:
        return self._mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointDamaged(f'step {s} is damaged: {_damage(e, self.directory)}') from None

    s, out = self._newest_readable(read, step, set_aside=True)
    self.restored_step = s
    return unflatten(target, out['state']), out['data'], out['meta']

  def _check_matches(self, step: int, abstract: dict) -> None:
    """CheckpointError (the config's fault: same for every step) when the stored keys or shapes
    differ from `abstract`'s; CheckpointDamaged when the step's metadata cannot be read."""
    stored = self.stored_keys(step)
    if stored is None:
      raise CheckpointDamaged(_unreadable(self.directory, step))
    missing = sorted(set(abstract) - stored)
    unexpected = sorted(stored - set(abstract))
    shapes = self._stored_shapes.get(step, {})
    reshaped = sorted(k for k in set(abstract) & stored if k in shapes and shapes[k] is not None
                      and tuple(shapes[k]) != tuple(abstract[k].shape))
    if missing or unexpected or reshaped:
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} does not match this config: missing '
          f'{missing[:6]}{"..." if len(missing) > 6 else ""}, unexpected '
          f'{unexpected[:6]}{"..." if len(unexpected) > 6 else ""}, other shapes '
          f'{reshaped[:6]}{"..." if len(reshaped) > 6 else ""}: use the config it was '
          'written with (see its meta), or a fresh --workdir')

  def _newest_readable(self, read, step: Optional[int], set_aside: bool):
    """(step, read(step)) for `step`, or else for the newest step that reads; damaged newer
    steps are named in a warning (and moved aside when `set_aside`)."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    damaged = []
    for s in steps:
      try:
        out = read(s)
      except CheckpointDamaged as e:
        if step is not None:
          raise CheckpointDamaged(f'checkpoint {self.directory}: {e}: restore an older step, or '
                                  'let the job pick the newest intact one') from None
        damaged.append((s, str(e)))
        continue
      if damaged:
        self._report_damaged(damaged, s, set_aside)
      return s, out
    raise CheckpointDamaged(
        f'every checkpoint in {self.directory} is damaged ({damaged[0][1]}; '
        f'{len(damaged)} step(s)): start again with a fresh --workdir (or move '
        f'{self.directory} aside)')

  def _report_damaged(self, damaged: list, intact: int, set_aside: bool) -> None:
    where = ''
    if set_aside:
      aside = self.directory + '.damaged'
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for s, _ in damaged:
          dst = os.path.join(aside, str(s))
          n = 1
          while os.path.exists(dst):
            dst, n = os.path.join(aside, f'{s}.{n}'), n + 1
          shutil.move(os.path.join(self.directory, str(s)), dst)
      self._reload()
      for s, _ in damaged:
        self._stored_keys.pop(s, None)
        self._stored_shapes.pop(s, None)
      where = f'; moved to {aside}/ (delete it once you no longer need it)'
    for s, why in damaged:
      print(f'warning: checkpoint {self.directory}: {why}; using step {intact}, the newest '
            f'intact one{where}', file=sys.stderr, flush=True)

  def restore_subset(self, flat_target: dict, step: Optional[int] = None) -> dict:
    """Restores only the flat keys of `flat_target` ({'ema.blocks.0.x': ShapeDtypeStruct}) from
    the state of `step` (default: latest) as host NumPy arrays: loading one network reads nothing
    else, and needs no knowledge of the optimiser or the rest of the train state."""
    # Host NumPy values: every process reads the whole network, and the caller places it on its
    # mesh (a single-device array could not be device_put across hosts).
    abstract = {k: _abstract(v) for k, v in flat_target.items()}
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype)
                    for k, v in abstract.items()}

    def read(s):
      stored = self.stored_keys(s)
      if stored is None:
        raise CheckpointDamaged(_unreadable(self.directory, s))
      missing = sorted(set(flat_target) - stored)
      if missing:
        raise CheckpointError(
            f'checkpoint {self.directory}/{s} lacks {missing[:4]}'
            f'{"..." if len(missing) > 4 else ""}: it was written for another model config')
      try:
        with ocp.PyTreeCheckpointer() as ckptr:
          return ckptr.restore(os.path.join(self.directory, str(s), 'state'),
                               args=ocp.args.PyTreeRestore(item=abstract,
                                                           restore_args=restore_args,
                                                           partial_restore=True))
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointDamaged(f'step {s} is damaged: {_damage(e, self.directory)}') from None

    return self._newest_readable(read, step, set_aside=False)[1]

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
      self._stored_shapes[step] = {k: getattr(v, 'shape', None) for k, v in tree.items()}
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
    with self._space_errors():
      self._mngr.wait_until_finished()
      self._in_flight = None

  def close(self):
    try:
      self.wait()
    finally:
      try:
        self._mngr.close()
      except Exception as e:  # pylint: disable=broad-except
        if not no_space(e):   # the failed save was reported already
          raise
      finally:
        self._remove_unfinished()   # again: background writers may have still been running


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


def _unreadable(directory: str, step: int) -> str:
  return (f'step {step} is damaged: {step}/state cannot be read, not even its list of arrays '
          '(a data or metadata file is truncated, overwritten or missing)')


def _damage(e: Exception, directory: str) -> str:
  """What a failed read says about the damage, short: the file and the reason."""
  text = ' '.join(str(e).split())
  text = text.split(' [tensorstore_spec', 1)[0]
  files = re.findall(r'local file "([^"]+)"', text)
  reason = text.rsplit(': ', 1)[-1] if ': ' in text else text
  if files:
    path = files[-1]
    rel = os.path.relpath(path, directory) if path.startswith(directory) else path
    return f'{rel}: {reason[:200]}'
  return f'{type(e).__name__}: {reason[:200]}'


def _short(e: Exception) -> str:
  s = str(e).strip().splitlines()
  return (s[0] if s else type(e).__name__)[:300]
