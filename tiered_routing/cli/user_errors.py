"""How the binaries end on a user's mistake: one clear line, not a traceback.

A bad config value, a missing file, a damaged checkpoint, a directory in use,
a full disk or a read-only directory is the user's to fix, and the message
that says how is the exception's own; printed after 5-200 frames of library
internals it is easy to miss. `run` starts a binary like `absl.app.run` and
prints such errors as `error: <message>` on stderr with exit status 1
(`--show_traceback` re-raises them). Anything else is a bug and keeps its
traceback. Ctrl-C ends with status 130, as shells expect. Both end the
process without the interpreter's shutdown (`exit_now`), which tf.data can
deadlock. `--help` lists the binary's flags (the gin flags included).
"""

import errno
import logging
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

from tiered_routing.cli import gin_flags
from tiered_routing.cli import quiet_logs
from tiered_routing.train import checkpoint_integrity
from tiered_routing.train import model_dir_lock

_SHOW_TRACEBACK = flags.DEFINE_bool(
    "show_traceback", False,
    "On a user error (bad value, missing file, damaged checkpoint, full "
    "disk), show the traceback instead of the one-line message.")

# Errors whose message tells the user what to change.
USER_ERRORS = (
    ValueError,
    FloatingPointError,  # The NaN guard: names the step and the checkpoint.
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    checkpoint_integrity.CheckpointDamagedError,
    model_dir_lock.ModelDirInUseError,
)
# OSErrors that are the machine's state, not a bug.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def is_user_error(error: BaseException) -> bool:
  if isinstance(error, USER_ERRORS):
    return True
  return isinstance(error, OSError) and error.errno in USER_ERRNOS


def message(error: BaseException) -> str:
  """`error: <message>` (a missing message names the type)."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.strerror}: {error.filename}"
  return f"error: {text}"


def exit_now(status: int) -> None:
  """Ends the process with `status` without the interpreter's shutdown.

  A tf.data pipeline stopped by an error while other elements were inside
  `tf.numpy_function` (the mc4_json parser) deadlocks Python's shutdown:
  3 of 4 runs hung at 0% CPU after printing the error. Every `with` block
  has already closed (locks released, checkpoints written) when a binary
  gets here, so only the output streams need flushing."""
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


def guarded(
    main: Callable[[Sequence[str]], None],
    exit_fn: Callable[[int], None] = exit_now,
):
  """`main`, ending user errors with one line on stderr and status 1
  (`exit_fn`: tests pass sys.exit)."""

  def run_main(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except KeyboardInterrupt as e:
      print(f"Interrupted: {e}" if str(e) else "Interrupted.",
            file=sys.stderr)
      exit_fn(EXIT_INTERRUPTED)
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e) or _SHOW_TRACEBACK.value:
        raise
      print(message(e), file=sys.stderr)
      print("(--show_traceback shows where it was raised)", file=sys.stderr)
      exit_fn(EXIT_USER_ERROR)

  return run_main


def _show_flags_in_help(main: Callable[[Sequence[str]], None]) -> None:
  """`--help` lists only the main module's own flags, and the binaries'
  flags live in shared modules (`gin_flags`, here, the binary's module):
  make those the main module's key flags."""
  modules = {gin_flags.__name__, quiet_logs.__name__, __name__,
             main.__module__}
  for module in modules:
    for flag in flags.FLAGS.get_key_flags_for_module(module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run` with the gin flags and the one-line user errors."""
  _show_flags_in_help(main)
  quiet_logs.install()
  app.run(guarded(main), flags_parser=gin_flags.parse_flags)
