"""A benchmark's original files missing or unusable: the user's to fix (dgia_jax.errors.USER_ERRORS)."""


class SourceError(Exception):
  """The message names the file or record."""


class SourceMissing(SourceError, FileNotFoundError):
  """The folder, the annotation file or the image folder is not there."""


class SourceInvalid(SourceError, ValueError):
  """The annotation file or its records cannot be read as the benchmark's."""
