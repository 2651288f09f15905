"""A sweep's jobs: their result files, and several workers to run them.

Each (configuration, seed, forget language) unit of a sweep is saved as
`runs/<config>/seed<s>/<lang>/result.json` (`result_path`); a rerun keeps
the units that have one.

On a small CPU host one process cannot keep every core busy: XLA:CPU
splits the sweep's small matrix products (d_model 128, 2048 tokens a step)
over threads with enough overhead that two single-threaded processes, one
per core, run the training step about 30% faster in all than one process
with two threads (docs/performance.md). The sweep's jobs,
one per (configuration, seed), are independent, so each worker claims the
next unclaimed job and runs it; the parent only computes the baselines,
watches the result files for its progress line and rewrites the report
after each new result.

A job is claimed by creating `runs/<config>/seed<s>/CLAIM` with O_EXCL, so
two workers never run one job; the parent removes stale claims before it
starts the workers (a killed sweep's workers die with it, see
`cli.tradeoff`), so a rerun resumes every unfinished job.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Mapping, Optional, Protocol, Sequence

from tiered_routing.train import atomic_file
from tiered_routing.unlearning import sweep_progress

CLAIM = "CLAIM"
SEQUENTIAL = "sequential"  # A seed's sequence directory, beside languages'.


class WorkersFailed(RuntimeError):
  """A worker process exited with an error (its log says why)."""


# Version 2: rows carry the audits beyond mean loss (`forget_audits`). A
# unit saved by an older version is forgotten again on resume (its
# original and reference checkpoints are reused, not retrained).
RESULT_VERSION = 2


def is_current(path: str, audited: bool = False) -> bool:
  """Whether a unit's result exists, was written by this version and, when
  `audited`, carries the audits (a unit saved without them, outside an
  earlier sweep's `audit_configurations`, is forgotten again)."""
  if not os.path.exists(path):
    return False
  try:
    payload = load_result(path)
  except (OSError, ValueError):
    return False  # Unreadable: redo it.
  # Version-2 results written before the audit scope existed were audited.
  return payload.get("version", 1) == RESULT_VERSION and (
      not audited or payload.get("audited", True)
  )


def result_path(output_dir: str, name: str, seed: int, code: str) -> str:
  return os.path.join(output_dir, "runs", name, f"seed{seed}", code,
                      "result.json")


def save_result(
    path: str, result, seed: int, timing: Mapping[str, float]
) -> dict:
  """Writes one unit's rows (a runner.ConfigurationResult) atomically.

  `timing` (`UnitClock.timing`) goes into the payload: its cost in wall
  and CPU seconds, not into the rows (a rerun writes the same tables).
  """
  rows = []
  for r in result.results:
    row = r.to_row()
    row["seed"] = seed
    rows.append(row)
  payload = {
      "version": RESULT_VERSION,
      "seed": seed,
      "rows": rows,
      "languages": result.languages,
      **timing,
      "audited": bool(result.audit_seconds),
      "audit_seconds": result.audit_seconds,
      "audit_cpu_seconds": result.audit_cpu_seconds,
  }
  atomic_file.write_text(path, json.dumps(payload, indent=1) + "\n")
  return payload


def save_sequential(
    path: str, rows: list, seed: int, timing: Mapping[str, float]
) -> dict:
  """Writes one (configuration, seed)'s sequential removals atomically:
  a payload with no per-language-unit rows and the sequence's rows
  (`sequential_removals.run_sequence`) under 'sequential'."""
  payload = {
      "version": RESULT_VERSION,
      "seed": seed,
      "rows": [],
      "languages": {},
      "sequential": [{**row, "seed": seed} for row in rows],
      **timing,
  }
  atomic_file.write_text(path, json.dumps(payload, indent=1) + "\n")
  return payload


class UnitClock:
  """Wall and CPU seconds (this process, every thread) since `start`.

  CPU time is the sweep's cost measure: wall time also counts waits for
  the other worker's core and pauses of the machine.
  """

  def __init__(self):
    self.start()

  def start(self) -> None:
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def timing(self, **extra: float) -> dict[str, float]:
    return {"wall_s": time.perf_counter() - self.wall,
            "cpu_s": time.process_time() - self.cpu, **extra}


def load_result(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class Job:
  """One (configuration, seed): trained once, then each language forgotten.

  Attributes:
    name: the configuration's name.
    seed: the training seed.
    seed_dir: runs/<name>/seed<seed>.
    result_paths: one result.json per forget language.
    train_weight: estimated cost of training the original.
    forget_weight: estimated cost of forgetting one language.
    sequential_weight: estimated cost of the sequential removals (a
      result path in a `SEQUENTIAL` directory); 0 = none.
    audited_paths: those of `result_paths` whose units run the audits.
  """

  name: str
  seed: int
  seed_dir: str
  result_paths: tuple[str, ...]
  train_weight: float
  forget_weight: float
  sequential_weight: float = 0.0
  audited_paths: tuple[str, ...] = ()

  def is_done(self, path: str) -> bool:
    """Whether one of `result_paths` is current (`is_current`)."""
    return is_current(path, audited=path in self.audited_paths)

  def missing(self) -> list[str]:
    return [p for p in self.result_paths if not self.is_done(p)]

  def weight_of(self, path: str) -> float:
    """The estimated cost of one of `result_paths`."""
    if os.path.basename(os.path.dirname(path)) == SEQUENTIAL:
      return self.sequential_weight
    return self.forget_weight

  def remaining_weight(self) -> float:
    """Estimated cost still ahead: one forget per missing result, plus the
    original's training while no result exists (after the first, the
    original is trained and checkpointed)."""
    missing = self.missing()
    first = len(missing) == len(self.result_paths)
    train = self.train_weight if first else 0.0
    return train + sum(self.weight_of(p) for p in missing)


def claim_order(jobs: Sequence[Job], priority: Sequence[str]) -> list[Job]:
  """Configuration by configuration in `priority` order, seeds within.

  A sweep stopped early (or read while it runs) then has every seed of
  its first configurations, each with its interval, rather than one seed
  of everything and no interval at all; the research questions' own
  configurations go first when `priority` lists them first (the cpu
  preset's CONFIGURATIONS). Names missing from `priority` go last.
  """
  rank = {name: i for i, name in enumerate(priority)}
  return sorted(jobs, key=lambda j: (rank.get(j.name, len(rank)), j.seed))


def claim(job: Job) -> bool:
  """True if this process now owns `job` (atomic create of its CLAIM)."""
  os.makedirs(job.seed_dir, exist_ok=True)
  try:
    fd = os.open(os.path.join(job.seed_dir, CLAIM),
                 os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(f"{os.getpid()}\n")
  return True


def clear_claims(jobs: Sequence[Job]) -> int:
  """Removes every job's CLAIM (no worker may be running); the count."""
  removed = 0
  for job in jobs:
    path = os.path.join(job.seed_dir, CLAIM)
    if os.path.exists(path):
      os.remove(path)
      removed += 1
  return removed


class Process(Protocol):
  """What the parent needs of a worker (subprocess.Popen has it)."""

  def poll(self) -> Optional[int]:
    ...


def _credit(job: Job, seen: set, progress: sweep_progress.Progress):
  """Logs a progress line for each of `job`'s results new since last time."""
  for path in job.result_paths:
    if path in seen or not job.is_done(path):
      continue
    first = not any(p in seen for p in job.result_paths)
    seen.add(path)
    weight = job.weight_of(path) + (job.train_weight if first else 0.0)
    language = os.path.basename(os.path.dirname(path))
    progress.done(weight, f"{job.name} seed {job.seed} forgot {language}")


def watch(
    jobs: Sequence[Job],
    processes: Sequence[Process],
    on_result: Callable[[], None] = lambda: None,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
  """Waits for every worker, logging the sweep's progress line per result.

  Args:
    jobs: the sweep's jobs (results already on disk count as restored).
    processes: the running workers.
    on_result: called after each poll that found new results (the parent
      rewrites the report from the results so far).
    poll_s: seconds between looks at the result files.
    sleep: waits (tests pass their own).

  Returns:
    The workers' exit codes.
  """
  seen = {p for j in jobs for p in j.result_paths if j.is_done(p)}
  todo = sum(j.remaining_weight() for j in jobs)
  total = sum(len(j.result_paths) for j in jobs)
  progress = sweep_progress.Progress(total, todo)
  progress.done_units = len(seen)
  while True:
    codes = [p.poll() for p in processes]
    before = len(seen)
    for job in jobs:
      _credit(job, seen, progress)
    if len(seen) > before:
      on_result()
    if all(c is not None for c in codes):
      return codes
    sleep(poll_s)
