"""`hf:ORG/NAME[@REVISION]` sources: the one place the optional `huggingface_hub` is imported."""
from __future__ import annotations

import glob
import os
from typing import Optional, Sequence

from didi_jax import errors


def snapshot(repo_id: str, patterns: Sequence[str], fallback: Sequence[str] = (), *,
             revision: Optional[str] = None) -> str:
  """A local directory holding the files of `repo_id` that match `patterns` (downloaded or from
  the HF cache); when that brings no `*.safetensors` and `fallback` is given, the files matching
  `fallback` instead (e.g. a PyTorch `*.bin`). Any failure is one CheckpointError with the fix."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise errors.CheckpointError(
        f'hf:{repo_id} needs the huggingface_hub package: pip install huggingface_hub, or '
        'download the files yourself and pass the local directory') from None
  try:
    path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                             allow_patterns=list(patterns))
    if fallback and not glob.glob(os.path.join(path, '*.safetensors')):
      path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                               allow_patterns=list(fallback))
  except Exception as e:  # network, auth, offline cache miss: all mean the same to the user
    raise errors.CheckpointError(
        f'could not fetch hf:{repo_id} ({type(e).__name__}: {str(e)[:200]}): check the '
        'repository name and the network (or HF_HUB_OFFLINE=1 with a cached copy), or pass a '
        'local directory') from None
  return path
