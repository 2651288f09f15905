r"""Paired differences between two sweep reports, seed by seed.

  python -m tiered_routing.cli.compare_reports \
      --report_a=docs/results/cpu_1200 --report_b=docs/results/cpu_audits \
      [--table=originals] [--metrics=mean_loss,min_unigram_margin] \
      [--output=/tmp/a_vs_b.csv]

A sweep's `comparisons.csv` pairs rows inside one sweep. Two sweeps of one
grid that differ in one setting (1,200 training steps against 900, say)
train the same (configuration, seed) from the same initialization and data
stream, so their rows pair the same way: for each (config,
forget_language, method) in both reports' `--table` (`originals.csv` or
`results_by_seed.csv`) and each metric, the difference a - b is taken on
every seed both have and summarized as its mean with the half-width of the
95% t-interval over those seeds (`sweep_statistics.mean_ci95`); `resolved`
says the interval excludes zero, `p_value` is the paired t-test's and
`q_value` / `resolved_fdr` the Benjamini-Hochberg false discovery rate over
the printed table (`sweep_statistics.with_false_discovery_rate`). Prints
the table in markdown and, with --output, writes it as CSV (whole or not
at all).

With --same_rows it asks instead whether two runs of the same units agree
to the last character (determinism across machines, `docs/determinism.md`):
for each per-seed table (`per_language`, `results_by_seed`, `originals`) it
counts the rows both reports have (same configuration, seed, forget
language, method or model, language) and how many of them are identical,
and names the first few that are not.
"""

import csv
import math
import os
from typing import Mapping, Sequence

from absl import flags

from tiered_routing.cli import user_errors
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_statistics

_REPORT_A = flags.DEFINE_string(
    "report_a", None, "The first report (a sweep's output or report dir).")
_REPORT_B = flags.DEFINE_string(
    "report_b", None, "The second report; differences are a - b.")
TABLES = ("originals", "results_by_seed")
_TABLE = flags.DEFINE_enum(
    "table", "originals", TABLES, "The per-seed table to pair.")
_METRICS = flags.DEFINE_list(
    "metrics", None,
    "Columns to compare (default: every numeric column both tables have).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "A CSV file for the table (default: print only).")
_SAME_ROWS = flags.DEFINE_bool(
    "same_rows", False,
    "Count the rows both reports have and those identical to the last "
    "character, per table, instead of differences.")

KEY_COLUMNS = ("config", "forget_language", "method")
SEED_COLUMN = "seed"
# The per-seed tables and the columns that name one of their rows.
ROW_KEYS = {
    "per_language": ("config", "seed", "forget_language", "model",
                     "language"),
    "results_by_seed": KEY_COLUMNS + (SEED_COLUMN,),
    "originals": KEY_COLUMNS + (SEED_COLUMN,),
}
MARKDOWN_COLUMNS = (
    ("config", "config", "{}"),
    ("forget", "forget_language", "{}"),
    ("method", "method", "{}"),
    ("metric", "metric", "{}"),
    ("seeds", "seeds", "{:d}"),
    ("a", "a_mean", "{:.3f}"),
    ("b", "b_mean", "{:.3f}"),
    ("a - b (95% CI)", "diff", "{:+.3f}"),
    ("resolved", "resolved", "{}"),
    ("q (BH)", "q_value", "{:.2g}"),
    ("at 5% FDR", "resolved_fdr", "{}"),
)


def read_table(report_dir: str, table: str) -> list[dict[str, str]]:
  path = os.path.join(report_dir, f"{table}.csv")
  if not os.path.exists(path):
    raise ValueError(
        f"{path} does not exist: a report directory holds {table}.csv "
        "(written by scripts/tradeoff.py or cli.rewrite_report).")
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _number(text: str) -> float | None:
  try:
    value = float(text)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def numeric_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
  """Columns, other than the keys and the seed, with a finite number in
  some row."""
  skip = set(KEY_COLUMNS) | {SEED_COLUMN}
  columns = list(rows[0]) if rows else []
  return [c for c in columns if c not in skip
          and any(_number(r.get(c)) is not None for r in rows)]


def _by_key(rows) -> dict[tuple, dict[str, Mapping[str, str]]]:
  grouped = {}
  for row in rows:
    key = tuple(row[k] for k in KEY_COLUMNS)
    grouped.setdefault(key, {})[row[SEED_COLUMN]] = row
  return grouped


def _metric_row(key, metric, seeds_a, seeds_b) -> dict | None:
  """One (key, metric)'s paired difference over the seeds where both have
  a finite value; None when none does."""
  pairs = [(_number(seeds_a[s].get(metric)), _number(seeds_b[s].get(metric)))
           for s in sorted(set(seeds_a) & set(seeds_b), key=int)]
  pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
  if not pairs:
    return None
  diffs = [a - b for a, b in pairs]
  diff, half = sweep_statistics.mean_ci95(diffs)
  return {
      **dict(zip(KEY_COLUMNS, key)), "metric": metric, "seeds": len(pairs),
      "a_mean": sum(a for a, _ in pairs) / len(pairs),
      "b_mean": sum(b for _, b in pairs) / len(pairs),
      "diff_mean": diff, "diff_ci95": half,
      "resolved": sweep_statistics.excludes_zero(diff, half),
      "p_value": sweep_statistics.paired_t_p_value(diffs),
  }


def compare(rows_a, rows_b, metrics: Sequence[str] | None = None):
  """Paired rows a - b (module docstring), in report a's row order."""
  if metrics is None:
    in_b = set(numeric_columns(rows_b))
    metrics = [c for c in numeric_columns(rows_a) if c in in_b]
  for name, rows in (("a", rows_a), ("b", rows_b)):
    missing = [m for m in metrics if rows and m not in rows[0]]
    if missing:
      raise ValueError(f"Report {name} has no column {missing}; it has "
                       f"{numeric_columns(rows)}.")
  a, b = _by_key(rows_a), _by_key(rows_b)
  out = []
  for key in a:
    if key in b:
      out += [r for m in metrics
              if (r := _metric_row(key, m, a[key], b[key])) is not None]
  return sweep_statistics.with_false_discovery_rate(out)


def same_rows(report_a: str, report_b: str) -> list[dict]:
  """Per table of ROW_KEYS: rows in both reports, and how many of them are
  identical (every column, as written); `differ` names up to 3 others."""
  out = []
  for table, keys in ROW_KEYS.items():
    a, b = ({tuple(r.get(k, "") for k in keys): r
             for r in read_table(d, table)} for d in (report_a, report_b))
    common = [k for k in a if k in b]
    differ = [k for k in common if a[k] != b[k]]
    out.append({"table": table, "common": len(common),
                "identical": len(common) - len(differ),
                "differ": "; ".join(":".join(map(str, k))
                                    for k in differ[:3])})
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  if not _REPORT_A.value or not _REPORT_B.value:
    raise ValueError("--report_a and --report_b are required: two report "
                     "directories (each holds originals.csv).")
  if _SAME_ROWS.value:
    print(sweep_report.markdown_table(
        same_rows(_REPORT_A.value, _REPORT_B.value),
        (("table", "table", "{}"), ("rows in both", "common", "{:d}"),
         ("identical", "identical", "{:d}"), ("first differing", "differ",
                                              "{}"))))
    return
  rows = compare(read_table(_REPORT_A.value, _TABLE.value),
                 read_table(_REPORT_B.value, _TABLE.value), _METRICS.value)
  if not rows:
    raise ValueError(
        f"{_REPORT_A.value} and {_REPORT_B.value} share no (config, "
        f"forget_language, method, seed) in {_TABLE.value}.csv.")
  if _OUTPUT.value:
    sweep_report.write_csv_rows(_OUTPUT.value, rows)
  print(sweep_report.comparisons_summary(rows))
  print(sweep_report.markdown_table(rows, MARKDOWN_COLUMNS))


if __name__ == "__main__":
  user_errors.run(main)
