"""One progress line for a whole sweep: units done, elapsed time and ETA.

A sweep's units differ in cost by orders of magnitude (a one-partition
retrain of n = 16 against a full retrain of a shared model), so the ETA
weighs every unit by an estimate of its training FLOPs (active parameters x
tokens, `weights`) and extrapolates from the weight done so far in this
process (units restored from a previous run count as neither done nor
remaining). A `--workers` process sees only the jobs it claims, so its line
counts those and leaves the ETA to the parent's (`worker=True`).
"""

import dataclasses
import time
from typing import Callable, Optional

from absl import logging


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass
class Progress:
  """Counts weighted units; `done` logs the sweep's progress line.

  Attributes:
    total_units: units in the sweep (restored ones included).
    remaining_weight: estimated cost of the units still to run.
    clock: seconds since an arbitrary origin (tests pass their own).
    worker: the line of one `--workers` process: its own units, no ETA
      (its share of the remaining work is not known in advance).
  """

  total_units: int
  remaining_weight: float
  clock: Callable[[], float] = time.monotonic
  worker: bool = False
  done_units: int = 0
  done_weight: float = 0.0
  skipped: int = 0
  start: Optional[float] = None

  def __post_init__(self):
    self.start = self.clock()

  def skip(self) -> None:
    """A unit restored from an earlier run."""
    self.done_units += 1
    self.skipped += 1

  def done(self, weight: float, what: str) -> str:
    """A unit of `weight` finished; logs and returns the progress line."""
    self.done_units += 1
    self.done_weight += weight
    self.remaining_weight = max(self.remaining_weight - weight, 0.0)
    elapsed = self.clock() - self.start
    if self.worker:
      line = (
          f"this worker: units done {self.done_units - self.skipped} "
          f"({what}) | elapsed {_clock(elapsed)} | the sweep's line and "
          "ETA are in the parent's log"
      )
      logging.info("%s", line)
      return line
    if self.done_weight > 0:
      eta = _clock(elapsed * self.remaining_weight / self.done_weight)
    else:
      eta = "?"
    line = (
        f"sweep {self.done_units}/{self.total_units} units "
        f"({what}) | elapsed {_clock(elapsed)} | ETA {eta}"
    )
    logging.info("%s", line)
    return line
