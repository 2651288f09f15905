"""The trade-off table (Markdown) and Pareto plot (PNG) of unlearning results.

Rows are `UnlearningResult.to_row()` dicts. Forget quality is the share of the
gap to the never-saw-it reference that a method closed
(`forget_gap_closed`: 0 = unchanged, 1 = as if never trained on the
language); utility loss is the rise of the retained languages' mean
validation loss (`retain_loss_delta`, nats). A method is on the Pareto front
when no other row forgets at least as well with at most as much utility loss
(one of the two strictly better). Forgetting *beyond* the reference earns
nothing: the gap is capped at 1 before comparing, so a gradient-ascent run
that overshoots does not dominate an exact retrain.

Figures use the Agg canvas without pyplot (no global state), as in
`analysis.plots`. Files are written atomically (temporary file + rename), so
a reader never sees half a table.
"""

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg
import numpy as np

from tiered_routing.train import atomic_file

# (header, row key, format) of the Markdown table.
TABLE_COLUMNS = (
    ("config", "run", "{}"),
    ("method", "method", "{}"),
    ("forget loss rise", "forget_loss_delta", "{:+.3f}"),
    ("gap closed", "forget_gap_closed", "{:.2f}"),
    ("retain Δloss", "retain_loss_delta", "{:+.3f}"),
    ("retain Δbpb", "retain_bpb_delta", "{:+.4f}"),
    ("family Δloss", "family_loss_delta", "{:+.3f}"),
    ("steps", "steps", "{:d}"),
    ("FLOPs", "flops", "{:.2e}"),
    ("top-m mass", "comp_top_m_mass", "{:.2f}"),
    ("entropy", "comp_entropy", "{:.2f}"),
    ("MI bits", "comp_mi_bits", "{:.2f}"),
)
FORGET_KEY, UTILITY_KEY = "forget_gap_closed", "retain_loss_delta"
_MARKERS = "osD^v<>Ph*X"


def _format(fmt: str, value: Any) -> str:
  if value is None or value == "":
    return ""
  if isinstance(value, float) and math.isnan(value):
    return "n/a"
  if fmt == "{:d}":
    value = int(value)
  return fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The trade-off table as GitHub Markdown, one line per row."""
  missing = sorted({k for _, k, _ in TABLE_COLUMNS for r in rows if k not in r})
  if missing:
    raise ValueError(f"Rows lack the table columns {missing}.")
  lines = [
      "| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
      "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
  ]
  for row in rows:
    cells = [_format(fmt, row[k]) for _, k, fmt in TABLE_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def pareto_front(
    forget: Sequence[float], utility_loss: Sequence[float]
) -> np.ndarray:
  """Indices of the non-dominated points, by increasing forget quality.

  Args:
    forget: forget quality per point (higher is better; capped at 1).
    utility_loss: utility loss per point (lower is better).

  Returns:
    int indices; points with a NaN coordinate are never on the front.
  """
  x = np.minimum(np.asarray(forget, np.float64), 1.0)
  y = np.asarray(utility_loss, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(
        f"forget {x.shape} and utility_loss {y.shape} must be "
        "vectors of one length."
    )
  ok = np.isfinite(x) & np.isfinite(y)
  front = []
  for i in np.flatnonzero(ok):
    better_eq = ok & (x >= x[i]) & (y <= y[i])
    strictly = (x > x[i]) | (y < y[i])
    if not np.any(better_eq & strictly):
      front.append(i)
  front = np.asarray(front, np.int64)
  return front[np.lexsort((y[front], x[front]))] if front.size else front


def _draw_front(ax, x, y, mask, x_clip, style, label) -> None:
  """A Pareto front over the rows in `mask`: step line and ringed markers."""
  idx = np.flatnonzero(mask)
  front = idx[pareto_front(x[idx], y[idx])] if idx.size else idx
  if not front.size:
    return
  fx = np.clip(np.minimum(x[front], 1.0), *x_clip)
  ax.step(
      fx,
      y[front],
      where="post",
      linestyle=style,
      color="0.2",
      linewidth=1,
      label=label,
      zorder=2,
  )
  ax.scatter(
      fx,
      y[front],
      s=150,
      facecolors="none",
      edgecolors="0.2",
      linewidths=1,
      linestyle=style,
      zorder=2,
  )


def _scatter(ax, rows, x, y, x_clip, palette, runs, methods) -> None:
  """One marker per row: colour = configuration, shape = method; gaps
  beyond the axis are drawn at its edge, hollow, labelled with their
  value."""
  for i, row in enumerate(rows):
    xc = float(np.clip(x[i], *x_clip))
    clipped = not math.isnan(x[i]) and xc != x[i]
    color = palette[runs.index(row["run"])]
    ax.scatter(
        [xc],
        [y[i]],
        s=55,
        linewidths=1.4,
        zorder=3,
        marker=_MARKERS[methods.index(row["method"]) % len(_MARKERS)],
        edgecolors=color,
        facecolors="none" if clipped else color,
    )
    if clipped:
      ax.annotate(
          f"{x[i]:.1f}",
          (xc, y[i]),
          fontsize=7,
          xytext=(3, 3),
          textcoords="offset points",
      )


def _axes_and_legend(ax, x_clip, palette, runs, methods) -> None:
  ax.axvline(1.0, color="0.7", linewidth=0.8)
  ax.axhline(0.0, color="0.7", linewidth=0.8)
  ax.set_xlim(x_clip[0] - 0.05, x_clip[1] + 0.15)
  ax.set_yscale("symlog", linthresh=0.05)
  ax.set_xlabel(
      "forget quality: share of the gap to the never-trained "
      "reference closed (1 = as if never trained on it)"
  )
  ax.set_ylabel(
      "utility loss: retained languages' mean Δ validation loss "
      "(nats, symlog)"
  )
  handles = [
      ax.scatter(
          [], [], marker=_MARKERS[j % len(_MARKERS)], color="0.4", label=m
      )
      for j, m in enumerate(methods)
  ]
  handles += [
      ax.scatter([], [], marker="s", color=palette[j], label=r)
      for j, r in enumerate(runs)
  ]
  handles += [h for h in ax.get_lines() if h.get_label().startswith("Pareto")]
  ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: str,
    title: str = "",
    max_x: float = 4.0,
) -> None:
  """Utility loss vs forget quality; one marker per (config, method).

  Colours are configurations, marker shapes methods. Two Pareto fronts are
  drawn (step lines, front points ringed): over every method, and over the
  approximate ones (no 'exact_*' retrain or drop), since the exact methods
  reach forget quality 1 by construction and their cost, which this plot
  leaves out, is what the others save. Gaps beyond `max_x` are drawn at it,
  hollow, labelled with their value.
  """
  runs = list(dict.fromkeys(r["run"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  x = np.array([float(r[FORGET_KEY]) for r in rows])
  y = np.array([float(r[UTILITY_KEY]) for r in rows])
  finite = x[np.isfinite(x)]
  x_clip = (
      min(-0.1, float(finite.min(initial=0.0)) - 0.1),
      min(max_x, max(1.2, float(finite.max(initial=1.0)) + 0.1)),
  )
  fig = figure_lib.Figure(figsize=(9, 6), layout="constrained")
  ax = fig.subplots()
  palette = _palette(len(runs))
  _scatter(ax, rows, x, y, x_clip, palette, runs, methods)
  approximate = np.array([not r["method"].startswith("exact") for r in rows])
  _draw_front(
      ax,
      x,
      y,
      np.ones(len(rows), bool),
      x_clip,
      "-",
      "Pareto front, all methods",
  )
  _draw_front(
      ax, x, y, approximate, x_clip, "--", "Pareto front, approximate methods"
  )
  _axes_and_legend(ax, x_clip, palette, runs, methods)
  if title:
    ax.set_title(title, fontsize=10)
  backend_agg.FigureCanvasAgg(fig)
  with atomic_file.replacing(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)


def _palette(n: int) -> list:
  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def write_csv_rows(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Rows as CSV (columns in first-seen order, blank where missing)."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  out = io.StringIO()
  writer = csv.DictWriter(
      out, fieldnames=columns, restval="", lineterminator="\n"
  )
  writer.writeheader()
  writer.writerows(rows)
  atomic_file.write_text(path, out.getvalue())


_LEGEND = (
    "\nforget loss rise: the forget language's validation loss after minus "
    "before (nats/token). gap closed: that rise over the rise of the "
    "reference model that never saw the language (1 = as if never trained "
    "on it). retain / family Δ: mean change over the other languages / the "
    "other languages of its family. steps, FLOPs: unlearning cost (6 N T "
    "for training tokens, 2 N T for forward-only tokens, N = active "
    "parameters; the exact retrain of a strict partition counts that "
    "partition only). top-m mass, entropy, MI: compartmentalization of the "
    "forget language in the trained model (validation routing, averaged "
    "over MoE layers).\n"
)


def write_outputs(
    output_dir: str, payloads: Sequence[Mapping[str, Any]], title: str
) -> None:
  """results.csv, results.md, pareto.png and per_language.csv, atomically.

  Args:
    output_dir: where to write.
    payloads: per configuration, {'rows': [to_row() dicts], 'languages':
      {model: {code: {'loss', 'bpb', ...}}}}.
    title: heading of the table and the plot.
  """
  rows = [r for p in payloads for r in p["rows"]]
  if not rows:
    return
  write_csv_rows(os.path.join(output_dir, "results.csv"), rows)
  atomic_file.write_text(
      os.path.join(output_dir, "results.md"),
      f"# {title}\n\n" + markdown_table(rows) + _LEGEND,
  )
  plot_pareto(rows, os.path.join(output_dir, "pareto.png"), title=title)
  per_language = []
  for p in payloads:
    for model, results in p["languages"].items():
      for code, r in results.items():
        per_language.append(
            {
                "run": p["rows"][0]["run"],
                "model": model,
                "language": code,
                "loss": r["loss"],
                "bpb": r["bpb"],
            }
        )
  write_csv_rows(os.path.join(output_dir, "per_language.csv"), per_language)


def check_or_write_manifest(
    output_dir: str, manifest: Mapping[str, Any]
) -> bool:
  """Records a sweep's configuration in output_dir/sweep.json.

  Returns:
    True if the directory already held this same sweep (a resume).

  Raises:
    ValueError: if it holds a sweep with another configuration; results of
      the two must not mix.
  """
  path = os.path.join(output_dir, "sweep.json")
  if not os.path.exists(path):
    atomic_file.write_text(
        path, json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    )
    return False
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  diff = sorted(
      k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)
  )
  if diff:
    raise ValueError(
        f"{output_dir} holds a sweep run with a different {', '.join(diff)} "
        f"(recorded in {path}). Rerun with the same preset, gin files, "
        "bindings and environment to resume, or choose a new output "
        "directory."
    )
  return True
