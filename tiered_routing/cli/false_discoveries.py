r"""Which of a report's paired differences hold at a false discovery rate.

  python -m tiered_routing.cli.false_discoveries \
      --comparisons=docs/results/cpu/comparisons.csv [--all] \
      [--output_csv=/tmp/comparisons_fdr.csv]

A sweep's `comparisons.csv` asks many questions at once; with 190 of them
about 10 intervals exclude zero by chance alone where nothing differs.
This reads one such table (or `sequential_comparisons.csv`, or a
`compare_reports --output` table) and prints how many differences are
resolved and how many hold at a 5% false discovery rate (Benjamini-Hochberg
q-values, `sweep_statistics`), with the whole table as one family and, for
tables with a `kind` column, with each kind of question as its own; then
the rows that hold either way (every row with --all). Reports written
since p-values were recorded carry `p_value`; for older ones it is
recovered from the 95% t-interval (`sweep_statistics.p_value_of_interval`),
which determines it. --output_csv writes the table with `p_value`, the
q-values and the `resolved_fdr` columns as CSV (whole or not at all; never
over the table it read).
"""

import csv
import math
import os
from typing import Any, Sequence

from absl import flags

from tiered_routing.cli import user_errors
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_statistics
from tiered_routing.unlearning import sweep_tables

_COMPARISONS = flags.DEFINE_string(
    "comparisons", None, "A table of paired differences (comparisons.csv).")
_ALL = flags.DEFINE_bool(
    "all", False, "Print every row, not only those that hold at the FDR.")
_OUTPUT = flags.DEFINE_string(
    "output_csv", None,
    "A CSV file for the table with q-values (default: print only).")

NEEDED = ("seeds", "diff_mean", "diff_ci95", "resolved")


def _float(text: str) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return math.nan


def read_pairs(path: str) -> list[dict[str, Any]]:
  """The table's rows with numbers and booleans parsed, and `p_value`
  (read, or recovered from the interval)."""
  if not os.path.isfile(path):
    raise ValueError(f"--comparisons={path!r} is not a file: give a "
                     "report's comparisons.csv.")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  missing = [c for c in NEEDED if rows and c not in rows[0]]
  if not rows or missing:
    raise ValueError(f"{path} is not a table of paired differences: it "
                     f"lacks the columns {missing or list(NEEDED)}.")
  out = []
  for row in rows:
    if not row["seeds"].isdigit():
      raise ValueError(f"{path}: seeds={row['seeds']!r} in {row} is not a "
                       "count of seeds.")
    parsed = {**row, "seeds": int(row["seeds"]),
              "diff_mean": _float(row["diff_mean"]),
              "diff_ci95": _float(row["diff_ci95"]),
              "resolved": row["resolved"] == "True"}
    parsed["p_value"] = (
        _float(row["p_value"]) if "p_value" in row else
        sweep_statistics.p_value_of_interval(
            parsed["diff_mean"], parsed["diff_ci95"], parsed["seeds"]))
    out.append(parsed)
  return sweep_tables.with_q_values(out, by_kind="kind" in rows[0])


def main(argv: Sequence[str]) -> None:
  del argv
  if not _COMPARISONS.value:
    raise ValueError("--comparisons is required: a report's "
                     "comparisons.csv.")
  pairs = read_pairs(_COMPARISONS.value)
  if _OUTPUT.value:
    if os.path.abspath(_OUTPUT.value) == os.path.abspath(_COMPARISONS.value):
      raise ValueError(f"--output_csv={_OUTPUT.value!r} is the table being "
                       "read: give another path.")
    sweep_report.write_csv_rows(_OUTPUT.value, pairs)
  print(sweep_report.comparisons_summary(pairs))
  in_kind = f"resolved_fdr{sweep_tables.IN_KIND}"
  shown = pairs if _ALL.value else [
      r for r in pairs if r["resolved_fdr"] or r.get(in_kind)]
  columns = [c for c in sweep_report.COMPARISON_COLUMNS if c[1] in pairs[0]]
  print(sweep_report.markdown_table(shown, columns))


if __name__ == "__main__":
  user_errors.run(main)
