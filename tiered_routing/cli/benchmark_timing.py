"""Timing and result tables shared by the scripts/bench_*.py benchmarks.

Timing follows the usual rules for asynchronous JAX dispatch: compile ahead
of time (so compilation is reported separately, never mixed into a step),
run warm-up calls, then time every repeat up to `jax.block_until_ready` and
report the median, which is robust to the stray slow run a shared machine
produces. Tables are lists of dicts with a fixed column order, printed as
aligned text and written as CSV and Markdown.
"""

import csv
import dataclasses
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of one compiled function.

  Attributes:
    median_s: median over the timed repeats.
    min_s: fastest timed repeat.
    repeats: number of timed repeats (after warm-up).
    compile_s: lowering plus compilation.
  """

  median_s: float
  min_s: float
  repeats: int
  compile_s: float


def _run(fn: Callable[..., Any], args: Sequence[Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def compile_jitted(
    fn: Callable[..., Any], args: Sequence[Any]
) -> tuple[Callable[..., Any], float]:
  """(compiled fn, seconds spent lowering and compiling) for `args`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_interleaved(
    calls: Sequence[tuple[Callable[..., Any], Sequence[Any]]],
    *,
    warmup: int,
    repeats: int,
    budget_s: float = math.inf,
) -> list[Timing]:
  """Times compiled functions round-robin: f0, f1, ..., f0, f1, ...

  On a shared machine the load drifts; interleaving gives every function
  the same mix of quiet and busy moments, so ratios between them stay
  meaningful even when absolute times do not.

  Args:
    calls: (compiled fn, args) pairs; args are reused (not donated).
    warmup: untimed rounds (at least 1 is always run; its time decides how
      many rounds fit into `budget_s`).
    repeats: timed rounds wanted.
    budget_s: when the warm-up round shows that `repeats` rounds would take
      longer than this, fewer are run (at least one).

  Returns:
    One Timing per call (compile_s = 0; see `compile_jitted`).
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(
        f"repeats={repeats} must be >= 1 and warmup={warmup} " ">= 0."
    )
  for _ in range(max(1, warmup)):
    round_s = sum(_run(fn, args) for fn, args in calls)
  rounds = repeats
  if math.isfinite(budget_s) and round_s > 0:
    rounds = max(1, min(repeats, int(budget_s // round_s)))
  times = [[] for _ in calls]
  for _ in range(rounds):
    for i, (fn, args) in enumerate(calls):
      times[i].append(_run(fn, args))
  return [
      Timing(
          median_s=statistics.median(t),
          min_s=min(t),
          repeats=rounds,
          compile_s=0.0,
      )
      for t in times
  ]


def time_jitted(
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    warmup: int,
    repeats: int,
    budget_s: float = math.inf,
) -> Timing:
  """Compiles jitted `fn` for `args` and times it (see `time_interleaved`)."""
  compiled, compile_s = compile_jitted(fn, args)
  (timing,) = time_interleaved(
      [(compiled, args)], warmup=warmup, repeats=repeats, budget_s=budget_s
  )
  return dataclasses.replace(timing, compile_s=compile_s)


def format_value(value: Any) -> str:
  """Numbers with 3 significant digits (integers whole); others as str."""
  if isinstance(value, bool) or value is None:
    return "" if value is None else str(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
      return f"{value:.3g}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
  return str(value)


def text_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> str:
  """Rows as an aligned plain-text table (header line first)."""
  cells = [[format_value(row.get(c)) for c in columns] for row in rows]
  widths = [
      max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)
  ]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> str:
  """Rows as a GitHub Markdown table."""
  lines = [
      "| " + " | ".join(columns) + " |",
      "|" + "|".join("---:" for _ in columns) + "|",
  ]
  for row in rows:
    lines.append(
        "| " + " | ".join(format_value(row.get(c)) for c in columns) + " |"
    )
  return "\n".join(lines)


def write_outputs(
    output_dir: Optional[str],
    name: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    header: str = "",
) -> list[str]:
  """Writes `name`.csv (full precision) and `name`.md; returns the paths.

  Args:
    output_dir: target directory (created); None or '' writes nothing.
    name: file stem.
    rows: the table.
    columns: column order.
    header: Markdown text put above the table (e.g. the command line).
  """
  if not output_dir:
    return []
  os.makedirs(output_dir, exist_ok=True)
  csv_path = os.path.join(output_dir, f"{name}.csv")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  md_path = os.path.join(output_dir, f"{name}.md")
  with open(md_path, "w") as f:
    if header:
      f.write(header.rstrip() + "\n\n")
    f.write(markdown_table(rows, columns) + "\n")
  return [csv_path, md_path]


def machine_description() -> str:
  """Backend, device kind and count, host CPU count (for result headers)."""
  devices = jax.devices()
  return (
      f"backend={jax.default_backend()} devices={len(devices)}x"
      f"{devices[0].device_kind} host_cpus={os.cpu_count()} "
      f"jax={jax.__version__}"
  )
