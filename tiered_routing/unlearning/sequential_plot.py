"""sequential.csv and sequential.png: utility and cost over removal requests.

The per-seed rows of `sequential_removals.run_sequence` (with a 'seed'
column) become, per (configuration, method, removals k):

  sequential_by_seed.csv  every row as it was run;
  sequential.csv          the mean over seeds and the half-width of its 95%
                          t-interval of every number (`sweep_statistics`);
  sequential.png          one column of panels per configuration, against
                          k with 95% bands: the removed languages' mean gap
                          closed (1 = the exact model), the retained
                          languages' mean loss change against the exact
                          model after the same removals (0 = the utility
                          of a model that never saw them), and the
                          cumulative unlearning FLOPs (log scale: exact is
                          one partition retrain or nothing per request).

Figures use the Agg canvas without pyplot and are written atomically
(`plots.save_png`).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib import figure as figure_lib
from matplotlib import lines
import numpy as np

from tiered_routing.analysis import plots
from tiered_routing.unlearning import sweep_statistics

PANELS = (
    ("forget_gap_closed", "removed languages'\ngap closed (mean)", "linear"),
    ("retain_loss_delta_vs_exact",
     "retained Δloss\nvs exact (nats)", "linear"),
    ("cumulative_flops", "cumulative\nunlearning FLOPs", "log"),
)
# The reference line of each linear panel: the exact model's value.
_EXACT_LEVEL = {"forget_gap_closed": 1.0, "retain_loss_delta_vs_exact": 0.0}


def by_k(
    rows: Sequence[Mapping[str, Any]], run: str, method: str, column: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(k, mean, 95% half-width) of `column` over seeds, per removal count."""
  values: dict[int, list[float]] = {}
  for r in rows:
    if r["run"] == run and r["method"] == method:
      values.setdefault(int(r["removals"]), []).append(float(r[column]))
  ks = np.array(sorted(values), np.int64)
  stats = [sweep_statistics.mean_ci95(
      [v for v in values[k] if math.isfinite(v)]) for k in ks]
  mean = np.array([s[0] for s in stats], np.float64)
  half = np.nan_to_num(np.array([s[1] for s in stats], np.float64))
  return ks, mean, half


def _panel(ax, rows, run, colors, column, scale) -> None:
  for method, color in colors.items():
    ks, mean, half = by_k(rows, run, method, column)
    if not len(ks):
      continue
    if scale == "log":  # Zero cost (a drop, the mask) has no log.
      mean = np.where(mean > 0, mean, np.nan)
    ax.plot(ks, mean, color=color, marker="o", markersize=3, linewidth=1.3)
    ax.fill_between(ks, mean - half, mean + half, color=color, alpha=0.18,
                    linewidth=0)
  ax.set_yscale(scale)
  if column in _EXACT_LEVEL:
    ax.axhline(_EXACT_LEVEL[column], color="0.6", linewidth=0.8)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.tick_params(labelsize=7)


def plot_sequential(
    rows: Sequence[Mapping[str, Any]], path: str, title: str
) -> None:
  """Writes sequential.png (see the module docstring)."""
  runs = list(dict.fromkeys(r["run"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cmap = colormaps["tab10"]
  colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
  width = max(6.4, 0.8 + 3.2 * len(runs))
  fig = figure_lib.Figure(figsize=(width, 7.2), layout="constrained")
  axes = np.array(fig.subplots(len(PANELS), len(runs), squeeze=False))
  order = {r["removals"]: r["forget_language"] for r in rows}
  for j, run in enumerate(runs):
    for i, (column, label, scale) in enumerate(PANELS):
      ax = axes[i, j]
      _panel(ax, rows, run, colors, column, scale)
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
      if i == 0:
        ax.set_title(run, fontsize=9)
      if i == len(PANELS) - 1:
        ax.set_xlabel("removal requests k", fontsize=8)
  handles = [lines.Line2D([], [], color=c, marker="o", markersize=3,
                          label=m) for m, c in colors.items()]
  fig.legend(handles=handles, loc="outside lower center", fontsize=7,
             ncol=min(len(handles), max(1, int(width / 1.1))),
             frameon=False)
  last = order[max(order)]
  fig.suptitle(f"{title}\nremoved in order: {last.replace('+', ', ')}; "
               "mean and 95% interval over seeds", fontsize=9)
  plots.save_png(fig, path, dpi=100)
