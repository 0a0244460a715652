"""The user-error classes: what a user can fix (a config value, a file, the data, a workdir).

Every class here derives from `UserError`; the command lines catch that base and print its
message as one line (exit code 2), never a traceback. Messages name what was wrong and the fix.
They also derive from `ValueError` (or `OSError` for workdirs), so code that catches the builtin
keeps working. This module imports nothing from the package: every layer may raise these.
"""
from __future__ import annotations


class UserError(Exception):
  """Bad input a user can fix; the message is one line that names the fix."""


class ConfigError(UserError, ValueError):
  """A configuration value or combination that cannot run."""


class DataError(UserError, ValueError):
  """A corpus that is missing, empty, unreadable or too small."""


class PackingError(DataError):
  """Token data that cannot be packed into fixed-length blocks."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read, imported, restored or written (wrong layout or shape)."""


class CheckpointFormatError(CheckpointError):
  """A file that is not a readable PyTorch zip or safetensors file (empty, truncated, other)."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be used: it is a file, or it cannot be created or written."""


class DiskFullError(UserError, OSError):
  """A write that ran out of disk space (or quota); what was written before is intact."""
