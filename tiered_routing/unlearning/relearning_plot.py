"""Relearning curves: how much of the forgotten gap each attack brings back.

A relearning attack (`relearning`) fine-tunes the served model on a small
budget of text and records the forget language's held-out NLL before and
after every step (`<attack>_curve` in results_by_seed.csv). The summary
columns keep only the step at which half the gap comes back; the curves
show the whole course: a method that hid the language jumps back within
a step or two, one that removed it climbs as slowly as the never-saw-it
reference. Recovered after a step is

  (relearn_start_nll - nll) / (relearn_start_nll - relearn_original_nll),

0 = still as forgotten as served, 1 = back to the original (NaN when the
method forgot next to nothing: a gap <= `relearning.MIN_GAP_NATS`, 0.1
nats, has no meaningful fraction).

  long_rows         the curves in long format (relearning.csv): one row per
                    (run, forget_language, method, seed, attack, step).
  plot_relearning   small multiples, one panel per (run, forget language,
                    attack), one line per method: mean over seeds, 95%
                    t-band.
  write_plots       relearning.png (the largest own budget) and
                    relearning_related.png (every related language).

Figures use the Agg canvas without pyplot, as in `analysis.plots`, and are
written atomically (`plots.save_png`).
"""

import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from matplotlib import colormaps
from matplotlib import figure as figure_lib
from matplotlib import lines
import numpy as np

from tiered_routing.analysis import plots
from tiered_routing.unlearning import relearning
from tiered_routing.unlearning import sweep_statistics

CURVE_SUFFIX = sweep_statistics.PER_SEED_SUFFIX
RELATED_PREFIX = "relearn_related_"
_OWN = re.compile(r"relearn_(\d+)$")
# The `_steps` column counts the steps to this fraction recovered.
THRESHOLD = 0.5
MIN_GAP = relearning.MIN_GAP_NATS
LONG_COLUMNS = ("run", "forget_language", "method", "seed", "attack", "step",
                "nll", "recovered")
_COLUMNS = 4
# The y range always shows 0..1 and at most this much beyond (an attack
# that overshoots the original, or a curve that rises, is cut there).
_Y_RANGE = (-1.0, 2.0)


def attack_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every attack with a curve column, in first-seen order.

  The names are read from the columns, never from a list of budgets, so
  any `AuditConfig.relearn_budgets` and related languages are found.
  """
  columns = dict.fromkeys(k for r in rows for k in r)
  return [c[: -len(CURVE_SUFFIX)] for c in columns
          if c.endswith(CURVE_SUFFIX) and c.startswith("relearn_")]


def largest_own_attack(names: Sequence[str]) -> Optional[str]:
  """'relearn_<max budget>' of the forget language's own paragraphs: the
  strongest attack, the one that best tells hiding from removing."""
  own = [(int(m.group(1)), n) for n in names if (m := _OWN.match(n))]
  return max(own)[1] if own else None


def related_attacks(names: Sequence[str]) -> list[str]:
  """The attacks on related languages only ('relearn_related_<code>')."""
  return [n for n in names if n.startswith(RELATED_PREFIX)]


def parse_curve(value: Any) -> Optional[np.ndarray]:
  """A curve cell as float64 [steps + 1]; None when there is none (a
  dropped partition: absent, empty or NaN)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  if isinstance(value, str):
    value = value.split()
  curve = np.asarray(value, np.float64).reshape(-1)
  return curve if curve.size else None


def recovered(start: float, original: float, nll: np.ndarray) -> np.ndarray:
  """The fraction of the forgotten gap recovered at each point of `nll`
  (module doc); all NaN when the gap is <= `MIN_GAP` or not finite."""
  gap = start - original
  nll = np.asarray(nll, np.float64)
  if not (math.isfinite(gap) and gap > MIN_GAP):
    return np.full(nll.shape, math.nan)
  return (start - nll) / gap


def _number(value: Any) -> float:
  """A cell as a float (CSV rows hold strings); blank or None is NaN."""
  return math.nan if value in (None, "") else float(value)


def long_rows(
    rows: Sequence[Mapping[str, Any]],
    attacks: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
  """The curves of per-seed rows in long format (`LONG_COLUMNS`).

  Args:
    rows: results_by_seed rows (dicts or CSV-read strings).
    attacks: which attacks; default every one (`attack_names`).

  Returns:
    One dict per (row, attack, step) for every curve present; rows without
    one (a dropped partition) contribute nothing.
  """
  attacks = attack_names(rows) if attacks is None else attacks
  out = []
  for row in rows:
    start = _number(row.get("relearn_start_nll"))
    original = _number(row.get("relearn_original_nll"))
    for attack in attacks:
      nll = parse_curve(row.get(attack + CURVE_SUFFIX))
      if nll is None:
        continue
      fraction = recovered(start, original, nll)
      for step, (value, frac) in enumerate(zip(nll, fraction)):
        out.append({
            "run": row["run"], "forget_language": row["forget_language"],
            "method": row["method"], "seed": row["seed"], "attack": attack,
            "step": step, "nll": float(value), "recovered": float(frac),
        })
  return out


def _band(points: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
  """(steps, mean, lower, upper) over seeds at each step; the bounds are
  NaN where fewer than two seeds have a finite value (no interval)."""
  by_step: dict[int, list[float]] = {}
  for p in points:
    by_step.setdefault(int(p["step"]), []).append(float(p["recovered"]))
  steps = np.array(sorted(by_step), np.int64)
  stats = []
  for s in steps:
    finite = [v for v in by_step[s] if math.isfinite(v)]
    stats.append(sweep_statistics.mean_ci95(finite))
  mean, half = (np.array(x, np.float64).reshape(-1) for x in zip(*stats))
  return steps, mean, mean - half, mean + half


def _palette(methods: Sequence[str]) -> dict[str, Any]:
  """One colour per method, the same in every panel."""
  cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
  return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _panel(ax, points, colors, title: str) -> None:
  """One (run, forget language): a mean line and a 95% band per method,
  the half-recovered threshold dashed, 0 and 1 in grey."""
  for method, color in colors.items():
    mine = [p for p in points if p["method"] == method]
    if not mine:
      continue
    steps, mean, low, high = _band(mine)
    ax.plot(steps, mean, color=color, linewidth=1.4, marker="o",
            markersize=2.5, zorder=3)
    if np.any(np.isfinite(low)):
      ax.fill_between(steps, low, high, color=color, alpha=0.18,
                      linewidth=0, zorder=2)
  ax.axhline(THRESHOLD, color="0.3", linestyle="--", linewidth=0.9, zorder=1)
  for level in (0.0, 1.0):
    ax.axhline(level, color="0.75", linewidth=0.8, zorder=1)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.tick_params(labelsize=7)
  ax.set_title(title, fontsize=8)


def _legend(fig, colors, width: float) -> None:
  """One legend for all panels, below them: methods by colour, the
  threshold by its dashed line; as many columns as the width holds."""
  handles = [lines.Line2D([], [], color=c, linewidth=1.4, label=m)
             for m, c in colors.items()]
  handles.append(lines.Line2D(
      [], [], color="0.3", linestyle="--", linewidth=0.9,
      label=f"{THRESHOLD:g} recovered (the _steps threshold)"))
  inches = [0.6 + 0.055 * len(h.get_label()) for h in handles]  # Size 7.
  ncol = len(handles) if sum(inches) < width else max(
      1, int(width / max(inches)))
  fig.legend(handles=handles, loc="outside lower center", fontsize=7,
             ncol=ncol, frameon=False)


def _panels(points) -> list[tuple[str, str, str]]:
  """The (run, forget language, attack) triples present, in first-seen
  order: one panel each."""
  return list(dict.fromkeys(
      (p["run"], p["forget_language"], p["attack"]) for p in points))


def _label_axes(axes: np.ndarray, used: int) -> None:
  """Hides the grid's unused cells; each column's lowest panel gets the
  step ticks and label (sharing x hid them above an unused cell)."""
  nrows, ncols = axes.shape
  for i, ax in enumerate(axes.flat):
    ax.set_visible(i < used)
  for col in range(ncols):
    last = axes[min(nrows - 1, (used - 1 - col) // ncols), col]
    last.xaxis.set_tick_params(labelbottom=True)
    last.set_xlabel("fine-tuning step", fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel("fraction of forgotten gap\nrecovered", fontsize=8)


def _y_limits(points) -> tuple[float, float]:
  """Shared y limits: 0..1 padded, widened to the seeds' values within
  `_Y_RANGE`, so one wild seed does not flatten every panel."""
  values = np.array([p["recovered"] for p in points], np.float64)
  values = values[np.isfinite(values)]
  low = min(-0.05, float(values.min(initial=0.0)) - 0.05)
  high = max(1.05, float(values.max(initial=1.0)) + 0.05)
  return max(low, _Y_RANGE[0]), min(high, _Y_RANGE[1])


def _describe(attacks: set[str]) -> str:
  """What the attacker fine-tuned on, for the title."""
  own = [a for a in attacks if _OWN.match(a)]
  if own and len(attacks) == 1:
    budget = _OWN.match(own[0]).group(1)
    return (f"{own[0]}: fine-tuned on {budget} of the forget language's "
            "training paragraphs")
  if all(a.startswith(RELATED_PREFIX) for a in attacks):
    return (f"{RELATED_PREFIX}<code>: fine-tuned on a related language's "
            "training paragraphs only (code in each panel's title)")
  return ", ".join(sorted(attacks))


def _suptitle(fig, title: str, attacks: set[str], width: float) -> None:
  """The sweep's title, the attack and what line and band are, each
  wrapped to the figure's width (a one-panel figure is narrow)."""
  chars = max(40, int(width * 14))  # Characters per inch at fontsize 9.
  parts = [title] if title else []
  parts += [f"Relearning attack {_describe(attacks)}",
            "mean over seeds, shaded: 95% t-interval (>= 2 seeds)"]
  text = "\n".join(textwrap.fill(t, chars) for t in parts)
  fig.suptitle(text, fontsize=9)


def _panel_title(run: str, code: str, attacks: set[str]) -> str:
  """'<run>, forgetting <code>', with the related language attacked."""
  related = sorted(a[len(RELATED_PREFIX):] for a in attacks
                   if a.startswith(RELATED_PREFIX))
  return f"{run}, forgetting {code}" + (
      f" (on {', '.join(related)})" if related else "")


def plot_relearning(
    points: Sequence[Mapping[str, Any]], path, title: str = "", dpi: int = 100
):
  """Small multiples of the fraction of the gap recovered per step.

  Args:
    points: `long_rows` of the attack(s) to draw: one panel per (run,
      forget language, attack).
    path: the PNG to write.
    title: first line of the figure title (the sweep's).
    dpi: pixels per inch.

  Returns:
    The path written, or None when there is nothing to draw.
  """
  panels = _panels(points)
  if not panels:
    return None
  colors = _palette(list(dict.fromkeys(p["method"] for p in points)))
  ncols = min(_COLUMNS, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  width = 3.4 * ncols + 0.6
  fig = figure_lib.Figure(figsize=(width, 2.6 * nrows + 1.6),
                          layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
  for ax, (run, code, attack) in zip(axes.flat, panels):
    mine = [p for p in points if p["run"] == run
            and p["forget_language"] == code and p["attack"] == attack]
    _panel(ax, mine, colors, _panel_title(run, code, {attack}))
  axes[0, 0].set_ylim(*_y_limits(points))  # Shared by every panel.
  _label_axes(axes, len(panels))
  _legend(fig, colors, width)
  _suptitle(fig, title, {p["attack"] for p in points}, width)
  return plots.save_png(fig, path, dpi)


def related_points(points) -> list[dict[str, Any]]:
  """The related-language attacks' points (ur: hi and fa; zh: ja; ...)."""
  return [p for p in points if p["attack"].startswith(RELATED_PREFIX)]


def write_plots(points: Sequence[Mapping[str, Any]], output_dir: str,
                title: str = "") -> list:
  """relearning.png for the largest own budget and relearning_related.png
  for every related language (a panel each), where those attacks exist.

  Args:
    points: `long_rows` of every attack.
    output_dir: where to write.
    title: the sweep's title.

  Returns:
    The paths written.
  """
  names = list(dict.fromkeys(p["attack"] for p in points))
  own = largest_own_attack(names)
  written = []
  if own is not None:
    written.append(plot_relearning(
        [p for p in points if p["attack"] == own],
        os.path.join(output_dir, "relearning.png"), title))
  related = related_points(points)
  if related:
    written.append(plot_relearning(
        related, os.path.join(output_dir, "relearning_related.png"), title))
  return [w for w in written if w is not None]
