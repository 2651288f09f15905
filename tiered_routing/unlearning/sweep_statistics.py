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

A report asks many such questions at once, so some intervals exclude zero
by chance alone (about 1 in 20 where nothing differs). Each difference
also carries the paired t-test's p-value (the test dual to the interval:
p < 0.05 exactly when the interval excludes zero), and a table of them
gets Benjamini-Hochberg q-values (Benjamini & Hochberg 1995, "Controlling
the false discovery rate"): the differences with q <= 0.05 are the
largest set whose expected share of false discoveries is at most 5%. A
difference that is the same on every seed (a step count at its cap, say)
has an interval of width 0 and p = 0: the t-test cannot doubt it, and
neither can the interval; with 3 seeds that is weak evidence all the same.
"""

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from scipy import stats

KEY_COLUMNS = ("run", "forget_language", "method")
# Columns that hold a per-seed series (relearning curves), kept in
# results_by_seed.csv only.
PER_SEED_SUFFIX = "_curve"
SEED_COLUMN = "seed"
NAN = float("nan")
FDR_LEVEL = 0.05


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


def _two_sided_p(mean: float, sem: float, n: int) -> float:
  """P(|T| >= |mean / sem|) for Student's t on n - 1 degrees of freedom;
  a standard error of 0 gives the limits 0 (mean not 0) or 1 (mean 0)."""
  if sem == 0.0:
    return 0.0 if mean != 0.0 else 1.0
  return float(2.0 * stats.t.sf(abs(mean) / sem, n - 1))


def paired_t_p_value(diffs: Sequence[float]) -> float:
  """Two-sided p-value of the paired t-test that the mean difference is 0.

  NaN for fewer than 2 values or a non-finite one (as `mean_ci95`);
  differences that do not vary give the t statistic's limits: 0 (mean
  not 0) or 1 (mean 0), as their interval of width 0 does or does not
  exclude zero.
  """
  x = np.asarray([float(v) for v in diffs], np.float64)
  if x.size < 2 or not np.all(np.isfinite(x)):
    return NAN
  sem = float(np.std(x, ddof=1)) / math.sqrt(x.size)
  return _two_sided_p(float(np.mean(x)), sem, x.size)


def p_value_of_interval(mean: float, half: float, seeds: int) -> float:
  """The same p-value, from a 95% t-interval mean +- half over `seeds`
  differences (half = t_{0.975, seeds-1} * sem, so t = mean / sem): for
  tables written before p-values were recorded."""
  if seeds < 2 or not (math.isfinite(mean) and math.isfinite(half)):
    return NAN
  return _two_sided_p(
      mean, half / float(stats.t.ppf(0.975, seeds - 1)), seeds)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
  """Benjamini-Hochberg q-values of one family of tests.

  With the m finite p-values sorted, p_(1) <= ... <= p_(m), the q-value
  of p_(i) is min over j >= i of min(1, m * p_(j) / j); calling every
  test with q <= alpha keeps the expected false discovery rate at most
  alpha (for independent or positively dependent tests). NaN p-values
  (one seed) are not tests: they stay NaN and do not count in m.
  """
  p = np.asarray([float(v) for v in p_values], np.float64)
  q = np.full(p.shape, NAN)
  finite = np.flatnonzero(np.isfinite(p))
  m = finite.size
  if m:
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
  return [float(v) for v in q]


def with_false_discovery_rate(
    pairs: Sequence[Mapping[str, Any]],
    family: Optional[str] = None,
    suffix: str = "",
    level: float = FDR_LEVEL,
) -> list[dict[str, Any]]:
  """Rows of differences (each with `p_value`), with their q-values.

  Args:
    pairs: the rows of one table.
    family: a column that splits the table into families of questions,
      each corrected on its own (None: the whole table is one family).
    suffix: appended to the added columns' names.
    level: the false discovery rate.

  Returns:
    Copies of the rows with `q_value<suffix>` (Benjamini-Hochberg within
    the row's family) and `resolved_fdr<suffix>` (q <= level).
  """
  families = collections.defaultdict(list)
  for i, row in enumerate(pairs):
    families[row[family] if family else None].append(i)
  out = [dict(r) for r in pairs]
  for members in families.values():
    q_values = benjamini_hochberg([pairs[i]["p_value"] for i in members])
    for i, q in zip(members, q_values):
      out[i][f"q_value{suffix}"] = q
      out[i][f"resolved_fdr{suffix}"] = bool(q <= level)
  return out


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
    {seeds, diff_mean, diff_ci95, resolved, p_value}: resolved is True
    when the 95% interval of the difference excludes zero; p_value is the
    paired t-test's (`paired_t_p_value`).
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
      "p_value": paired_t_p_value(diffs),
  }
