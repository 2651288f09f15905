"""The sweep's Pareto plot: utility loss vs forget quality, with intervals.

One marker per (configuration, forget language, method), at the mean over
seeds, with the 95% intervals as error bars (`sweep_statistics`). Forget
quality is the share of the gap to the never-saw-it reference closed
(`forget_gap_closed`: 0 = unchanged, 1 = as if never trained on the
language); utility loss is the rise of the retained languages' mean loss
(`retain_loss_delta`, nats). A point is on the Pareto front when no other
forgets at least as well with at most as much utility loss (one of the two
strictly better); forgetting *beyond* the reference earns nothing, so the
gap is capped at 1 before comparing, and an overshooting gradient-ascent
run does not dominate an exact retrain. Fronts are drawn through the means.

Figures use the Agg canvas without pyplot (no global state), as in
`analysis.plots`, and are written atomically.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib import figure as figure_lib
from matplotlib import lines
from matplotlib import patches
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from tiered_routing.train import atomic_file

FORGET_KEY, UTILITY_KEY = "forget_gap_closed", "retain_loss_delta"
_MARKERS = "osD^v<>Ph*X"


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


def _draw_front(ax, x, y, mask, x_clip, style) -> None:
  """A Pareto front over the rows in `mask` (capped gaps compared, see the
  module doc): a step line and rings drawn where the points themselves
  are, not at the cap."""
  idx = np.flatnonzero(mask)
  front = idx[pareto_front(x[idx], y[idx])] if idx.size else idx
  if not front.size:
    return
  fx = np.clip(x[front], *x_clip)
  order = np.argsort(fx, kind="stable")
  ax.step(fx[order], y[front][order], where="post", linestyle=style,
          color="0.2", linewidth=1, zorder=2)
  ax.scatter(fx, y[front], s=150, facecolors="none", edgecolors="0.2",
             linewidths=1, linestyle=style, zorder=2)


def _dodged(x, y, x_clip, width: float = 0.025) -> np.ndarray:
  """x, with markers that would sit on top of each other (same position
  after clipping, e.g. one configuration's methods that are all the exact
  drop) spread side by side around it."""
  xc = np.clip(x, *x_clip)
  out = xc.copy()
  groups = {}
  for i, key in enumerate(zip(np.round(xc, 3), np.round(y, 4))):
    if np.all(np.isfinite(key)):
      groups.setdefault(key, []).append(i)
  for members in groups.values():
    for j, i in enumerate(members):
      out[i] = xc[i] + (j - (len(members) - 1) / 2) * width
  return out


def _scatter(ax, rows, x, y, x_clip, palette, runs, methods) -> None:
  """One marker per row at its means, with its 95% intervals as error bars:
  colour = configuration, shape = method; gaps beyond the axis are drawn
  at its edge, hollow, labelled with their value; coinciding markers are
  spread side by side (`_dodged`)."""
  dodged = _dodged(x, y, x_clip)
  for i, row in enumerate(rows):
    xc = float(dodged[i])
    clipped = not math.isnan(x[i]) and float(np.clip(x[i], *x_clip)) != x[i]
    color = palette[runs.index(row["run"])]
    x_err = _ci(row, FORGET_KEY)
    ax.errorbar(
        [xc],
        [y[i]],
        xerr=None if clipped or math.isnan(x_err) else [[x_err], [x_err]],
        yerr=None if math.isnan(_ci(row, UTILITY_KEY)) else [
            [_ci(row, UTILITY_KEY)], [_ci(row, UTILITY_KEY)]
        ],
        fmt="none",
        ecolor=color,
        elinewidth=0.8,
        alpha=0.6,
        zorder=2,
    )
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


def _ci(row: Mapping[str, Any], key: str) -> float:
  value = row.get(f"{key}_ci95", float("nan"))
  return float(value) if value not in (None, "") else float("nan")


def _mean(row: Mapping[str, Any], key: str) -> float:
  return float(row.get(f"{key}_mean", row.get(key, float("nan"))))


_Y_TICKS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _axes(ax, x_clip, title) -> None:
  ax.axvline(1.0, color="0.7", linewidth=0.8)
  ax.axhline(0.0, color="0.7", linewidth=0.8)
  ax.set_xlim(x_clip[0] - 0.05, x_clip[1] + 0.15)
  ax.set_yscale("symlog", linthresh=0.05)
  ax.set_xlabel("forget quality: share of the gap to the reference closed")
  ax.set_title(title, fontsize=9)


def _y_ticks(ax) -> None:
  """Labelled ticks on both sides of zero (symlog's own leave the small
  negative values, e.g. an exact retrain's -0.02, unreadable)."""
  low, high = ax.get_ylim()
  ticks = sorted({s * t + 0.0 for t in _Y_TICKS for s in (-1, 1)
                  if low <= s * t <= high})  # + 0.0: no '-0'.
  ax.set_yticks(ticks)
  ax.set_yticklabels([f"{t:g}" for t in ticks], fontsize=7)
  ax.yaxis.set_minor_locator(ticker.NullLocator())


def _legend(ax, palette, runs, methods) -> None:
  """Methods by marker shape (grey), configurations by colour (patches, so
  no configuration looks like the square method), fronts by line style."""
  handles = [
      lines.Line2D([], [], linestyle="none", color="0.4", label=m,
                   marker=_MARKERS[j % len(_MARKERS)])
      for j, m in enumerate(methods)
  ]
  handles += [patches.Patch(color=palette[j], label=r)
              for j, r in enumerate(runs)]
  handles += [
      lines.Line2D([], [], linestyle=style, color="0.2", marker="o",
                   markerfacecolor="none", markersize=9, label=label)
      for style, label in (("-", "Pareto front, all methods"),
                           ("--", "Pareto front, approximate methods"))
  ]
  ax.legend(handles=handles, fontsize=6, loc="upper left", ncol=2)


def _panel(ax, rows, x_clip, palette, runs, methods, title) -> None:
  """One forget language's points and fronts."""
  x = np.array([_mean(r, FORGET_KEY) for r in rows])
  y = np.array([_mean(r, UTILITY_KEY) for r in rows])
  _scatter(ax, rows, x, y, x_clip, palette, runs, methods)
  approximate = np.array([not r["method"].startswith("exact") for r in rows])
  _draw_front(ax, x, y, np.ones(len(rows), bool), x_clip, "-")
  _draw_front(ax, x, y, approximate, x_clip, "--")
  _axes(ax, x_clip, title)


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: str,
    title: str = "",
    max_x: float = 4.0,
) -> None:
  """Utility loss vs forget quality, one panel per forget language.

  `rows` are aggregated rows (`<metric>_mean`, `<metric>_ci95`) or plain
  per-run rows. Two Pareto fronts are drawn (step lines, front points
  ringed): over every method, and over the approximate ones (no 'exact_*'
  retrain or drop), since the exact methods reach forget quality 1 by
  construction and their cost, which this plot leaves out, is what the
  others save. Gaps beyond `max_x` are drawn at it, hollow, labelled.
  """
  runs = list(dict.fromkeys(r["run"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  langs = list(dict.fromkeys(r["forget_language"] for r in rows))
  finite = np.array([_mean(r, FORGET_KEY) for r in rows])
  finite = finite[np.isfinite(finite)]
  x_clip = (
      min(-0.1, float(finite.min(initial=0.0)) - 0.1),
      min(max_x, max(1.2, float(finite.max(initial=1.0)) + 0.1)),
  )
  fig = figure_lib.Figure(
      figsize=(6 * len(langs) + 3, 6), layout="constrained"
  )
  axes = np.atleast_1d(fig.subplots(1, len(langs), sharey=True))
  palette = _palette(len(runs))
  for ax, code in zip(axes, langs):
    mine = [r for r in rows if r["forget_language"] == code]
    _panel(ax, mine, x_clip, palette, runs, methods, f"forgetting {code}")
  axes[0].set_ylabel(
      "utility loss: retained languages' mean Δ loss (nats, symlog)"
  )
  _y_ticks(axes[0])  # The axes share y.
  _legend(axes[0], palette, runs, methods)
  if title:
    fig.suptitle(title, fontsize=10)
  backend_agg.FigureCanvasAgg(fig)
  with atomic_file.replacing(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)


def _palette(n: int) -> list:
  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]
