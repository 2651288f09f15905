"""Keeps the binaries' console to what the user acts on.

A quickstart training run printed 209 lines for 20 steps: 87 of Orbax's INFO
(every save's threads, renames and finalizers), 82 of SeqIO's (one per task:
"Automatically caching...", "not cached so using number of input examples",
"uncached FunctionDataset ... may overfit"), and JAX's "Unable to
initialize backend 'tpu'"; the progress line drowned. `install` filters
those records from absl's handler; warnings and errors of every library
still print, except SeqIO's about how it sizes mixtures and Orbax's
about opening a directory read-only (as analysis does on purpose), which
are not about this run. `--library_logs` shows everything.
"""

import logging

from absl import flags
from absl import logging as absl_logging

_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False,
    "Print Orbax's and SeqIO's INFO logs and SeqIO's caching warnings too.")

# Libraries whose INFO records are dropped (matched in the record's path).
QUIET_INFO_PATHS = ("/orbax/", "/seqio/", "/jax/_src/xla_bridge.py")
# Warnings that describe SeqIO's defaults, repeated once per task.
QUIET_WARNINGS = (
    "Using an uncached FunctionDataset for training",
    "not cached so using number of input examples",
    "Given directory is read only",  # Orbax, of our read-only readers.
)


class LibraryNoise(logging.Filter):
  """Drops the records above unless --library_logs."""

  def filter(self, record: logging.LogRecord) -> bool:
    if flags.FLAGS.is_parsed() and _LIBRARY_LOGS.value:
      return True
    path = record.pathname.replace("\\", "/")
    if record.levelno <= logging.INFO and any(
        p in path for p in QUIET_INFO_PATHS):
      return False
    if record.levelno == logging.WARNING and (
        "/seqio/" in path or "/orbax/" in path):
      message = record.getMessage()
      return not any(w in message for w in QUIET_WARNINGS)
    return True


def install() -> None:
  """Adds the filter to absl's handler (idempotent)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, LibraryNoise) for f in handler.filters):
    handler.addFilter(LibraryNoise())
