"""Ctrl-C and SIGTERM during training: stop after the step, save, exit 130.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens
to be. Inside an Orbax save that can leave the save half done and its
threads running (one time in seven: the interrupt was swallowed, training
ran to the end, and the process aborted in clean-up with a double free); a
SIGTERM (a scheduler's preemption) killed the run without a save. While
`StopRequests` is active both signals only set a flag; the trainer's hook
finishes the step, saves a checkpoint at it and raises `TrainingInterrupted`,
so the run resumes exactly there. A second Ctrl-C interrupts at once.
"""

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
  """Training stopped on a signal after saving a checkpoint."""


class StopRequests:
  """Within `with`, SIGINT and SIGTERM set `requested` instead of raising.

  Only the main thread can install signal handlers; elsewhere (a test
  thread) this does nothing and signals act as usual.
  """

  def __init__(self):
    self.requested: Optional[str] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C: stop now.
    self.requested = signal.Signals(signum).name

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
