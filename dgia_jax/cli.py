"""Command-line plumbing shared by the programs (`dgia_jax.main`, `dgia_jax.tools.*`).

Every program ends with `cli.run(main)` and its `main` starts with `cli.start(argv)`.
"""

import logging as pylogging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections.config_flags import config_path

from dgia_jax.common import config_files, errors, host_memory

_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Where compiled XLA programs are kept between runs, so that a resumed run or a rerun of the same "
    "config skips compilation (a ViT-B/16 train step takes ~4 min to compile for an H100). "
    "Default: $JAX_COMPILATION_CACHE_DIR if set, else user_cache_dir('xla'); '' turns the cache off.")


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache at `--compilation_cache_dir`; call before the
  first compilation. Programs that compile in under a second are not kept (JAX's default).
  Returns the directory ("" when off)."""
  path = _COMPILATION_CACHE_DIR.value
  if path is None:
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or config_files.user_cache_dir("xla")
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path) if path else None)  # off even if JAX's env says on
  return path


class _WithoutFailedCheckpointWrites:
  """Drops the logs orbax and asyncio write, with tracebacks from their own threads, when a
  checkpoint write fails (TensorStore: `Error writing ... in OCDBT database`): that failure reaches
  the program as one `error:` line (checkpointing.WriteError) and is logged nowhere else."""

  def filter(self, record) -> bool:
    if record.levelno < pylogging.ERROR:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
    return not ("Error writing" in text and "OCDBT database" in text)


class _WithoutNotices:
  """Drops warnings TFDS and orbax write on every run that are no news here: a builder config we
  pass on purpose (`Using custom data configuration`), the missing `dataset_info.json` of a data
  set not prepared yet (prepared next, or an `error:` with `data.prepare=False`), and a checkpoint
  folder opened read-only for inference or a stage-1 start (`read_only=True`, `is read only`)."""

  _STARTS = ("Using custom data configuration", "CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record) -> bool:
    text = record.getMessage()
    return not (text.startswith(self._STARTS) or text.endswith("has no dataset_info.json"))


def _drop_callbacks_into_a_closed_loop(unraisable) -> None:
  """After a failed checkpoint write, TensorStore finishes its other writes and calls back into
  orbax's event loop, closed by then; the failure itself reaches the program (WriteError), so
  those callbacks' `Event loop is closed` are dropped. Anything else goes to Python's default."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def start(argv: list[str]) -> None:
  """What every program does first: keep freed host memory (`host_memory`; before JAX starts its
  CPU threads, so before any computation), refuse positional arguments, log warnings and errors
  only (orbax logs every checkpoint step at INFO), keep a log file free of progress-bar redraws,
  and turn on the compilation cache."""
  host_memory.retain_freed_memory()
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_WithoutFailedCheckpointWrites())
  logging.get_absl_handler().addFilter(_WithoutNotices())
  sys.unraisablehook = _drop_callbacks_into_a_closed_loop
  if not sys.stderr.isatty():  # a log file: no carriage-return redraws from TFDS's bars either
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  enable_compilation_cache()


FIELD_CHECKPOINT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                       "field_checkpoint.py")  # the default --config of --checkpoint


def model_of_flags(workdir: str | None, checkpoint: str | None, config=None):
  """The model a program's `--workdir` (a dgia-jax run) or `--checkpoint` (a field checkpoint, described
  by `--config`) names: exactly one of them."""
  from dgia_jax.inference import rebuild  # only the programs that read a model need it

  if (workdir is None) == (checkpoint is None):
    raise errors.ConfigError("give exactly one of --workdir (a dgia-jax run) and --checkpoint (a field checkpoint, "
                             "IRRA's or DGCMIA's best.pth)")
  if checkpoint is None:
    return workdir
  if not os.path.isfile(checkpoint):
    raise errors.MissingPathError(f"--checkpoint {checkpoint}: no such file")
  return rebuild.FieldCheckpoint(checkpoint, config)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports, in one line, a bad flag value, a bad `--config.*` override and a
  `--config` file that cannot be loaded (missing, a folder, or raising), not a traceback.

  ml_collections finds `--config.*` overrides in `sys.argv`, not in the argv absl parses: `argv`
  stands in for `sys.argv` while parsing, so the overrides read are those of `argv`."""
  program_argv, sys.argv = sys.argv, list(argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # several missing flags are several lines: one line naming each
    sys.exit("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()))
  except Exception as e:  # ml_collections raises what it meets loading --config or applying an override
    problem = _config_problem(argv, e)
    if problem is None:
      raise
    sys.exit(f"error: {problem}")
  finally:
    sys.argv = program_argv
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if type(flag.value).__name__ == "_ErrorConfig":  # ml_collections' placeholder for a config that did not load
      cause = object.__getattribute__(flag.value, "_error")
      sys.exit(f"error: --{name} {flag.config_filename}: {_config_file_problem(flag.config_filename, cause)}")
  return rest


def _config_problem(argv: list[str], error: Exception) -> str | None:
  """What of `--config` and its overrides in `argv` (flag files read) made parsing raise `error`, in
  one line: the config file, else the first override whose path the config lacks or ml_collections
  cannot read (as it reads them, `config_path.get_value`), else the overrides together. None if
  the program has no `--config` flag, or neither a config nor an override is given."""
  if "config" not in flags.FLAGS:
    return None
  try:
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error:
    args = argv[1:]
  overrides = [a for a in args if re.match(r"-{1,2}(no)?config\.", a)]
  given = []  # the values of --config, in order (the last one counts)
  for i, a in enumerate(args):
    if a in ("-config", "--config"):
      given += args[i + 1:i + 2]
    elif re.match(r"-{1,2}config=", a):
      given.append(a.split("=", 1)[1])
  path = given[-1] if given else getattr(flags.FLAGS["config"], "config_filename", None)
  if not given and not path:
    return f"cannot apply {_shown(overrides[0])}: no --config given" if overrides else None
  try:
    config = config_files.load_config(path)
  except Exception as cause:
    return f"--config {path}: {_config_file_problem(path, cause)}"
  for flag in overrides:
    try:
      config_path.get_value(flag.split("=", 1)[0].split(".", 1)[1], config)
    except Exception as e:
      return _refused(_shown(flag), e)
  return _refused(" ".join(map(_shown, overrides)), error) if overrides else None


_QUOTES = "'\""


def _refused(flags_shown: str, e: Exception) -> str:
  """'unknown config key ...' (ml_collections' KeyError, its suggestion kept) or 'cannot apply ...'."""
  while e.args and isinstance(e.args[0], Exception):  # an AttributeError wrapping the KeyError
    e = e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
  if isinstance(e, KeyError) and lines[0][0] in _QUOTES:  # a quoted key: the config lacks it
    hint = f" ({' '.join(lines[1:])})" if lines[1:] else ""
    return f"unknown config key {lines[0].strip(_QUOTES)!r} in {flags_shown}{hint}"
  return f"cannot apply {flags_shown} ({type(e).__name__}: {lines[0]})"


def _shown(arg: str) -> str:
  """A command-line argument on one line: quoted and escaped if it holds a newline or another
  unprintable character."""
  return arg if arg.isprintable() else repr(arg)


def _config_file_problem(path: str, cause: Exception) -> str:
  """Why config file `path` did not load, in one line."""
  if not os.path.exists(path):
    return "no such file"
  if os.path.isdir(path):
    return "a folder, not a config file"
  lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
  return lines[-1] if lines else type(cause).__name__


def run(main) -> None:
  """Runs `main` as absl does, a bad flag reported in one line (`parse_flags`); a user's error
  (`errors.USER_ERRORS`) ends the program with `error: <it>` and exit status 1, no traceback, and so
  does an operating-system error (a path that is missing, a folder where a file was expected, no
  permission, a full disk): it names the file. Any other exception keeps its traceback."""

  def guarded(argv):
    try:
      return main(argv)
    except errors.USER_ERRORS as e:
      sys.exit(f"error: {e}")
    except OSError as e:
      where = f": {e.filename}" if e.filename else ""
      sys.exit(f"error: {e.strerror or e}{where}")

  app.run(guarded, flags_parser=parse_flags)
