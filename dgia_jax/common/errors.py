"""Errors that are the user's to fix, as opposed to bugs.

A flag or config value with no meaning, a path that is not there, a file or input that is there
but unusable, a missing optional dependency: every program prints one line, `error: <message>`
(the message names the flag, file or record), and exits 1 (`cli.run`); any other exception keeps
its traceback. Each class also subclasses the built-in error it stands for, so code that catches
`ValueError` or `FileNotFoundError` still does. The benchmarks' original files raise
`data_prep.errors.SourceError`s, which are user errors too (`USER_ERRORS`).
"""

import importlib

from data_prep import errors as source_errors


class UserError(Exception):
  """Something the user gave is wrong; the message says what and where."""


class ConfigError(UserError, ValueError):
  """A flag or config value with no meaning here, named in the message."""


class MissingPathError(UserError, FileNotFoundError):
  """A file or folder that should be there is not."""


class BadInputError(UserError, ValueError):
  """A file, record or query that is there but unusable: damaged, empty, not the expected layout."""


class MissingDependencyError(UserError, ImportError):
  """An optional package a chosen option needs is not installed."""


# The optional packages (import name: what to install, as requirements-dev.txt pins it).
OPTIONAL_PACKAGES = {"faiss": "faiss-cpu==1.15.1", "torch": "torch==2.13.0"}


def import_optional(module: str, purpose: str):
  """The optional package `module`, or MissingDependencyError: "<purpose> needs <module>: pip install ..."."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingDependencyError(f"{purpose} needs {module}: pip install {OPTIONAL_PACKAGES[module]}") from e


class WriteError(UserError, OSError):
  """A file could not be written (disk full, file-size limit, read-only target); what was there before is intact."""


class BusyError(UserError, BlockingIOError):
  """A run directory another live process is writing (its lock is held)."""


class CollapseError(UserError, RuntimeError):
  """A training run stopped because its in-batch relations related (nearly) every pair of a batch."""


class NonFiniteError(UserError, FloatingPointError):
  """Numbers that are not finite where figures or parameters are made from them: the model diverged."""


USER_ERRORS = (UserError, source_errors.SourceError)
