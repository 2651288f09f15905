"""Seeds to intervals: means, 95% t-intervals and paired differences.

Each trained configuration of the sweep is repeated over training seeds
(initialization, data order and unlearning batches). A table cell is the
mean over seeds with the half-width of its 95% confidence interval,

  mean +- t_{0.975, s - 1} * sd / sqrt(s)     (Student's t, s seeds),

so with 3 seeds the half-width is 2.48 standard deviations of a single
seed's value. Two rows are compared through their *paired* difference:
the difference of the two rows on the same seed (same original model and
data), whose interval is the same t-interval over the s differences. A
difference is called only when that interval excludes zero; otherwise it
is "not resolved". With one seed every interval is NaN (undefined).
"""

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

KEY_COLUMNS = ("run", "forget_language", "method")
# Columns that hold a per-seed series (relearning curves), kept in
# results_by_seed.csv only.
PER_SEED_SUFFIX = "_curve"
SEED_COLUMN = "seed"
NAN = float("nan")


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
  """(mean, half-width of the 95% t-interval); NaN half-width for < 2."""
  x = np.asarray([float(v) for v in values], np.float64)
  if x.size == 0:
    return NAN, NAN
  mean = float(np.mean(x))
  if x.size < 2 or not np.all(np.isfinite(x)):
    return mean, NAN
  sem = float(np.std(x, ddof=1)) / math.sqrt(x.size)
  return mean, float(stats.t.ppf(0.975, x.size - 1)) * sem


def excludes_zero(mean: float, half: float) -> bool:
  """Whether the interval mean +- half excludes zero (a NaN half-width,
  one seed, never does): the rule for calling a difference resolved."""
  return bool(math.isfinite(half) and abs(mean) > half)


def _is_number(value: Any) -> bool:
  return isinstance(value, (bool, int, float, np.number))


def _grouped(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, list]:
  groups = collections.defaultdict(list)
  for row in rows:
    missing = [k for k in KEY_COLUMNS + (SEED_COLUMN,) if k not in row]
    if missing:
      raise ValueError(f"A result row lacks the columns {missing}: {row}")
    groups[tuple(row[k] for k in KEY_COLUMNS)].append(row)
  for key, group in groups.items():
    seeds = [r[SEED_COLUMN] for r in group]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"Rows {key} repeat a seed: {sorted(seeds)}.")
  return groups


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (run, forget_language, method) over its seeds.

  Numeric columns (booleans count as 0 / 1) become `<column>_mean` and
  `<column>_ci95`; other columns are kept when every seed agrees and
  joined with '|' otherwise; series (`PER_SEED_SUFFIX`) are left out.
  `seeds` counts the seeds.
  """
  out = []
  for key, group in _grouped(rows).items():
    row = dict(zip(KEY_COLUMNS, key))
    row["seeds"] = len(group)
    columns = dict.fromkeys(c for r in group for c in r)
    for column in columns:
      if column in KEY_COLUMNS or column == SEED_COLUMN:
        continue
      if column.endswith(PER_SEED_SUFFIX):  # Curves: per seed only.
        continue
      values = [r.get(column) for r in group]
      if all(_is_number(v) for v in values):
        mean, half = mean_ci95(values)
        row[f"{column}_mean"], row[f"{column}_ci95"] = mean, half
      else:
        distinct = list(dict.fromkeys(str(v) for v in values))
        row[column] = "|".join(distinct)
    out.append(row)
  return out


def paired_difference(
    rows: Iterable[Mapping[str, Any]],
    a: Mapping[str, str],
    b: Mapping[str, str],
    metric: str,
) -> dict[str, Any]:
  """The paired difference a - b of `metric` over the seeds both have.

  Args:
    rows: per-seed rows.
    a, b: {run, forget_language, method} of the two rows.
    metric: a numeric column.

  Returns:
    {seeds, diff_mean, diff_ci95, resolved}: resolved is True when the
    95% interval of the difference excludes zero.
  """
  groups = _grouped(rows)
  by_seed = []
  for side in (a, b):
    key = tuple(side[k] for k in KEY_COLUMNS)
    if key not in groups:
      raise ValueError(f"No rows for {dict(side)}.")
    by_seed.append({r[SEED_COLUMN]: float(r[metric]) for r in groups[key]})
  common = sorted(set(by_seed[0]) & set(by_seed[1]))
  diffs = [by_seed[0][s] - by_seed[1][s] for s in common]
  mean, half = mean_ci95(diffs)
  resolved = excludes_zero(mean, half)
  return {
      "seeds": len(common),
      "diff_mean": mean,
      "diff_ci95": half,
      "resolved": resolved,
  }
