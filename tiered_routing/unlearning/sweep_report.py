"""The sweep's report files, written atomically after every unit.

  results_by_seed.csv  one row per (configuration, forget language, method,
                       seed): every column the runner produced.
  results.csv          the same over seeds (`sweep_statistics.aggregate`):
                       `<metric>_mean`, `<metric>_ci95` (95% t-interval
                       half-width) and `seeds`.
  results.md           the trade-off table of results.csv, mean +- CI.
  originals.csv / .md  each configuration's original models against the
                       unigram and bigram baselines (`sweep_tables`).
  comparisons.csv/.md  paired differences over seeds, with whether the
                       interval excludes zero (`resolved`), the paired
                       t-test's p-value and Benjamini-Hochberg q-values
                       over the table (`q_value`, `resolved_fdr`: q <=
                       0.05) and within each kind of question
                       (`q_value_in_kind`, `resolved_fdr_in_kind`).
  per_language.csv     every model's loss per language and seed, with the
                       language's baselines.
  pareto.png           `sweep_plot.plot_pareto` of results.csv.
  relearning.csv       the relearning attacks' curves in long format, one
                       row per (configuration, forget language, method,
                       seed, attack, step): held-out forget NLL and the
                       fraction of the forgotten gap recovered
                       (`relearning_plot.long_rows`); only when the rows
                       have curves (`relearn_*_curve`).
  relearning.png,      those curves per configuration and forget language,
  relearning_related.png  for the largest own budget and for each related
                       language (`relearning_plot.write_plots`).
  sequential.csv,      sequential removal requests (`sequential_removals`):
  sequential_by_seed.csv, utility and cost after each, over seeds and per
  sequential.png       seed (`sequential_plot`); only when a sweep has
                       `sequential_configurations`.
  sequential_comparisons.csv  their paired differences, method vs its
                       baseline after each request (`sweep_tables`).
  costs.csv            each unit's CPU seconds: the original's training,
                       the audits, the rest (`sweep_costs`).

A reader never sees half a file (temporary file + rename).
"""

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from tiered_routing.train import atomic_file
from tiered_routing.unlearning import relearning_plot
from tiered_routing.unlearning import sequential_plot
from tiered_routing.unlearning import sweep_costs
from tiered_routing.unlearning import sweep_plot
from tiered_routing.unlearning import sweep_statistics
from tiered_routing.unlearning import sweep_tables

# (header, column, format) of results.md; cells are mean +- CI.
TABLE_COLUMNS = (
    ("config", "run", "{}"),
    ("forget", "forget_language", "{}"),
    ("method", "method", "{}"),
    ("seeds", "seeds", "{:d}"),
    ("forget loss rise", "forget_loss_delta", "{:+.3f}"),
    ("gap closed", "forget_gap_closed", "{:.2f}"),
    ("at target", "reached_target", "{:.2f}"),
    ("retain Δloss", "retain_loss_delta", "{:+.3f}"),
    ("in-partition Δloss", "inside_loss_delta", "{:+.3f}"),
    ("other-partition Δloss", "outside_loss_delta", "{:+.3f}"),
    ("steps", "steps", "{:.0f}"),
    ("FLOPs", "flops", "{:.2e}"),
    ("entropy", "comp_entropy", "{:.2f}"),
    ("MI bits", "comp_mi_bits", "{:.2f}"),
)
ORIGINAL_COLUMNS = (
    ("config", "run", "{}"),
    ("seeds", "seeds", "{:d}"),
    ("mean loss", "mean_loss", "{:.3f}"),
    ("mean bpb", "mean_bpb", "{:.3f}"),
    ("min margin over unigram", "min_unigram_margin", "{:+.3f}"),
    ("worst language", "worst_language", "{}"),
    ("mean margin over bigram", "mean_bigram_margin", "{:+.3f}"),
    ("min margin over bigram", "min_bigram_margin", "{:+.3f}"),
)
COMPARISON_COLUMNS = (
    ("kind", "kind", "{}"),
    ("forget", "forget_language", "{}"),
    ("a", "a", "{}"),
    ("b", "b", "{}"),
    ("metric", "metric", "{}"),
    ("seeds", "seeds", "{:d}"),
    ("a - b", "diff_mean", "{:+.3f}"),
    ("95% CI", "diff_ci95", "±{:.3f}"),
    ("resolved", "resolved", "{}"),
    ("p", "p_value", "{:.2g}"),
    ("q, table", "q_value", "{:.2g}"),
    ("q, kind", f"q_value{sweep_tables.IN_KIND}", "{:.2g}"),
)


def _about(count: float) -> str:
  return f"{count:.1f}" if count < 10 else f"{count:.0f}"


def comparisons_summary(pairs: Sequence[Mapping[str, Any]]) -> str:
  """One paragraph on a table of differences: how many are tests (2 or
  more seeds), how many intervals exclude zero against how many would by
  chance alone, and how many hold at a 5% false discovery rate, over the
  whole table and (rows with a `kind`) within each kind of question."""
  tested = [r for r in pairs if math.isfinite(r["p_value"])]
  level = sweep_statistics.FDR_LEVEL
  text = (
      f"{len(tested)} paired differences over 2 or more seeds: "
      f"{sum(bool(r['resolved']) for r in tested)} resolved (the 95% "
      f"interval excludes zero), where about {_about(level * len(tested))} "
      "would be by chance alone if nothing differed. At a "
      f"{level:.0%} false discovery rate (Benjamini-Hochberg q <= {level}) "
      f"{sum(bool(r['resolved_fdr']) for r in tested)} hold over the "
      "whole table"
  )
  in_kind = f"resolved_fdr{sweep_tables.IN_KIND}"
  if tested and in_kind in tested[0]:
    kinds = list(dict.fromkeys(r["kind"] for r in tested))
    counts = [
        (k, sum(bool(r[in_kind]) for r in tested if r["kind"] == k),
         sum(r["kind"] == k for r in tested)) for k in kinds]
    text += "; with each kind of question its own family: " + ", ".join(
        f"{k} {held} of {n}" for k, held, n in counts)
  return text + ".\n"


def _cell(fmt: str, row: Mapping[str, Any], key: str) -> str:
  """`row[key]`, or `row[key_mean]` +- `row[key_ci95]`; blank if absent."""
  if f"{key}_mean" in row:
    mean, half = row[f"{key}_mean"], row.get(f"{key}_ci95", math.nan)
    if isinstance(mean, float) and math.isnan(mean):
      return "n/a"
    text = _format(fmt, mean)
    if isinstance(half, float) and math.isfinite(half):
      text += f" ± {_format(fmt.replace('+', ''), half)}"
    return text
  return _format(fmt, row.get(key, ""))


def _format(fmt: str, value: Any) -> str:
  if value is None or value == "":
    return ""
  if isinstance(value, float) and math.isnan(value):
    return "n/a"
  if fmt == "{:d}":
    value = int(value)
  return fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns=TABLE_COLUMNS):
  """Rows as a GitHub Markdown table (cells mean +- 95% CI)."""
  lines = [
      "| " + " | ".join(h for h, _, _ in columns) + " |",
      "|" + "|".join("---" for _ in columns) + "|",
  ]
  for row in rows:
    cells = [_cell(fmt, row, k) for _, k, fmt in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# A row's configuration is `run` inside the sweep (`tradeoff_metrics`) and
# `config` in every file a reader opens, as in the Markdown tables.
CSV_NAMES = {"run": "config"}


def write_csv_rows(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Rows as CSV (columns in first-seen order, blank where missing; the
  key `run` is written as `config`)."""
  rows = [{CSV_NAMES.get(k, k): v for k, v in r.items()} for r in rows]
  columns = list(dict.fromkeys(k for r in rows for k in r))
  out = io.StringIO()
  writer = csv.DictWriter(
      out, fieldnames=columns, restval="", lineterminator="\n"
  )
  writer.writeheader()
  writer.writerows(rows)
  atomic_file.write_text(path, out.getvalue())


_LEGEND = (
    "\nEach cell: mean over training seeds ± the half-width of its 95% "
    "t-interval (no interval with one seed). forget loss rise: the forget "
    "language's held-out loss after minus before (nats/token). gap closed: "
    "that rise over the rise to min(reference, uniform), the reference "
    "being the model that never saw the language (1 = as if never trained "
    "on it). retain Δ: mean change over the other languages; in-partition "
    "/ other-partition: over the other languages of the forget language's "
    "tier-1 partition / of the other partitions. steps, FLOPs: unlearning "
    "cost (6 N T for training tokens, 2 N T for forward-only tokens, N = "
    "active parameters). at target: share of seeds whose gradient method "
    "reached the reference's held-out forget loss (1 = compared at matched "
    "forget quality). entropy: of the forget language's routing over "
    "the experts it can reach (1 = spread evenly); MI: I(language; expert) "
    "in bits. Methods named 'a=b' are the same objective for that "
    "configuration (no retain data).\n"
)


def title(languages, source: str, seeds: int) -> str:
  """The heading of a sweep's tables and plots."""
  return (f"Forgetting {', '.join(languages)}: {source} data, {seeds} "
          f"seed{'s' if seeds > 1 else ''}")


def write_outputs(
    output_dir: str,
    payloads: Sequence[Mapping[str, Any]],
    title: str,
    baselines: Mapping[str, Mapping[str, float]],
) -> None:
  """Every report file of the module doc.

  Args:
    output_dir: where to write.
    payloads: per (configuration, seed, forget language): {'seed', 'rows':
      [row dicts with 'seed'], 'languages': {model: {code: {'loss', 'bpb',
      ...}}}}.
    title: heading of the tables and the plot.
    baselines: {code: {'unigram_loss', 'bigram_loss'}}.
  """
  costs = sweep_costs.cost_rows(payloads)
  if costs:
    write_csv_rows(os.path.join(output_dir, "costs.csv"), costs)
  sequential = [r for p in payloads for r in p.get("sequential", ())]
  if sequential:
    _write_sequential(output_dir, sequential, title)
  payloads = [p for p in payloads if p["rows"]]  # Not the sequences'.
  rows = [r for p in payloads for r in p["rows"]]
  if not rows:
    return
  path = lambda name: os.path.join(output_dir, name)
  aggregated = sweep_statistics.aggregate(rows)
  per_language = sweep_tables.per_language_rows(payloads, baselines)
  originals = sweep_tables.original_rows(per_language)
  pairs = sweep_tables.comparisons(rows, originals)
  write_csv_rows(path("results_by_seed.csv"), rows)
  write_csv_rows(path("results.csv"), aggregated)
  write_csv_rows(path("per_language.csv"), per_language)
  write_csv_rows(path("originals.csv"), originals)
  write_csv_rows(path("comparisons.csv"), pairs)
  atomic_file.write_text(
      path("results.md"), f"# {title}\n\n" + markdown_table(aggregated)
      + _LEGEND,
  )
  atomic_file.write_text(
      path("originals.md"),
      f"# {title}: original models\n\n"
      + markdown_table(
          sweep_statistics.aggregate(originals), ORIGINAL_COLUMNS
      ),
  )
  if pairs:
    atomic_file.write_text(
        path("comparisons.md"),
        f"# {title}: paired differences\n\n"
        + comparisons_summary(pairs) + "\n"
        + markdown_table(pairs, COMPARISON_COLUMNS),
    )
  sweep_plot.plot_pareto(aggregated, path("pareto.png"), title=title)
  _write_relearning(output_dir, rows, title)


def _write_relearning(
    output_dir: str, rows: Sequence[Mapping[str, Any]], title: str
) -> None:
  """relearning.csv and its plots, when the rows have curves (sweeps from
  before the relearning attacks have none and get no such files)."""
  points = relearning_plot.long_rows(rows)
  if not points:
    return
  write_csv_rows(os.path.join(output_dir, "relearning.csv"), points)
  relearning_plot.write_plots(points, output_dir, title)


def _write_sequential(
    output_dir: str, rows: Sequence[Mapping[str, Any]], title: str
) -> None:
  path = lambda name: os.path.join(output_dir, name)
  write_csv_rows(path("sequential_by_seed.csv"), rows)
  write_csv_rows(path("sequential.csv"), sweep_statistics.aggregate(rows))
  pairs = sweep_tables.sequential_comparisons(rows)
  if pairs:
    write_csv_rows(path("sequential_comparisons.csv"), pairs)
  sequential_plot.plot_sequential(rows, path("sequential.png"), title)


def check_or_write_manifest(
    output_dir: str,
    manifest: Mapping[str, Any],
    same: Optional[Callable[[str, Any, Any], bool]] = None,
) -> bool:
  """Records a sweep's configuration in output_dir/sweep.json.

  Args:
    output_dir: the sweep's directory.
    manifest: {key: value} that must match for a resume.
    same: same(key, recorded, current) says whether two values that differ
      as written still give the same results (default: never); the binary
      uses it to let a rerun change how often it checkpoints. A resume
      with such a change rewrites the record with the current values.

  Returns:
    True if the directory already held this same sweep (a resume).

  Raises:
    ValueError: if it holds a sweep with another configuration; results of
      the two must not mix.
  """
  path = os.path.join(output_dir, "sweep.json")
  text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
  if not os.path.exists(path):
    atomic_file.write_text(path, text)
    return False
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  changed = sorted(
      k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)
  )
  diff = [
      k for k in changed
      if same is None or not same(k, old.get(k), manifest.get(k))
  ]
  if diff:
    raise ValueError(
        f"{output_dir} holds a sweep run with a different {', '.join(diff)} "
        f"(recorded in {path}). Rerun with the same preset, gin files, "
        "bindings and environment to resume, or choose a new output "
        "directory."
    )
  if changed:
    atomic_file.write_text(path, text)
  return True
