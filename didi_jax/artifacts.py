"""Files a run writes: the workdir check, atomic JSON, and the JSON encoding of numpy values.

Every job writes its results through these functions, so a crash never leaves a half-written
results file and a bad workdir fails before any work starts.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from didi_jax import errors


def json_default(o):
  """JSON encoding of numpy scalars and arrays (anything else: its str)."""
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_json(path: str, obj) -> None:
  """Writes `obj` as indented JSON atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.{uuid.uuid4().hex[:8]}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1, default=json_default)
  os.replace(tmp, path)


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` if needed and checks that it is a writable directory.

  Raises WorkdirError with the fix when it is a file, cannot be created, or is read-only.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.WorkdirError(f'--workdir={workdir} is a file, not a directory: pass a '
                              'directory (it is created if missing)')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test_{uuid.uuid4().hex[:8]}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise errors.WorkdirError(f'--workdir={workdir} cannot be written ({e.strerror or e}): '
                              'choose a directory you can write to') from None
  return path
