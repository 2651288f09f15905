"""A PNG of a training run's curves, from its metrics.jsonl.

TensorBoard shows the same scalars interactively; this is the figure a
report or a README can hold, made without a server: the train loss and its
cross-entropy part, each language's train cross-entropy (coloured by
family, so a partition whose languages lag shows as one colour), and the
learning rate with the fraction of tokens the MoE layers dropped (capacity
overflow, which silently skips an expert FFN for those tokens).
"""

from collections.abc import Mapping
from typing import Any

from etils import epath
from matplotlib import figure as figure_lib
import numpy as np

from tiered_routing.analysis import plots
from tiered_routing.tier1 import languages

_FAMILY_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def curves(
    records: Mapping[int, Mapping[str, Any]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{series: (steps, values)} of the plotted series, steps ascending.

  Series: 'loss', 'cross_entropy', 'cross_entropy/<code>' per language
  present, 'learning_rate', 'dropped_fraction' (mean over MoE layers).
  Steps without a value for a series are left out of it.
  """
  steps = sorted(records)
  names = ["loss", "cross_entropy", "learning_rate"] + [
      f"cross_entropy/{c}" for c in languages.CODES
  ]
  out = {}
  for name in names:
    points = [(s, records[s][name]) for s in steps if name in records[s]]
    if points:
      out[name] = tuple(np.array(v, float) for v in zip(*points))
  dropped = []
  for s in steps:
    values = [v for k, v in records[s].items()
              if k.startswith("router/") and k.endswith("/dropped_fraction")]
    if values:
      dropped.append((s, float(np.mean(values))))
  if dropped:
    out["dropped_fraction"] = tuple(np.array(v, float) for v in zip(*dropped))
  return out


def _family_colour(code: str) -> str:
  family = languages.get(code).family
  return _FAMILY_COLOURS[languages.FAMILIES.index(family)]


def plot_training_curves(
    records: Mapping[int, Mapping[str, Any]], path, title: str = ""
) -> epath.Path:
  """Writes the three-panel PNG of `curves(records)` to `path`."""
  series = curves(records)
  if "loss" not in series:
    raise ValueError("No 'loss' in the metrics: nothing to plot.")
  fig = figure_lib.Figure(figsize=(14, 4.2))
  ax_loss, ax_lang, ax_lr = fig.subplots(1, 3)
  for name, style in (("loss", "-"), ("cross_entropy", "--")):
    if name in series:
      ax_loss.plot(*series[name], style, label=name)
  ax_loss.set(xlabel="step", ylabel="nats / token", title="train loss")
  ax_loss.legend(fontsize=8)
  for code in languages.CODES:
    if f"cross_entropy/{code}" in series:
      steps, values = series[f"cross_entropy/{code}"]
      ax_lang.plot(steps, values, color=_family_colour(code), lw=1)
      ax_lang.annotate(code, (steps[-1], values[-1]), fontsize=7,
                       xytext=(3, 0), textcoords="offset points",
                       color=_family_colour(code), va="center")
  ax_lang.set(xlabel="step", ylabel="nats / token",
              title="train cross-entropy per language")
  for family, colour in zip(languages.FAMILIES, _FAMILY_COLOURS):
    ax_lang.plot([], [], color=colour,
                 label=" ".join(languages.family_members(family)))
  ax_lang.legend(fontsize=7, title="family", title_fontsize=7)
  if "learning_rate" in series:
    ax_lr.plot(*series["learning_rate"], color="black", label="learning rate")
  ax_lr.set(xlabel="step", ylabel="learning rate",
            title="schedule and dropped tokens")
  if "dropped_fraction" in series:
    ax_drop = ax_lr.twinx()
    ax_drop.plot(*series["dropped_fraction"], color="tab:red")
    ax_drop.set_ylabel("dropped fraction (mean over MoE layers)",
                       color="tab:red")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return plots.save_png(fig, path, dpi=100)
