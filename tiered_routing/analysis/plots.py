"""PNG heatmaps of routing statistics.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
through pyplot, so plotting keeps no global state, needs no display and is
safe in background threads of an eval binary. Figures are saved without
`bbox_inches="tight"`, so a PNG is exactly `figsize * dpi` pixels.
"""

from collections.abc import Sequence
import os

from etils import epath
from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib
import numpy as np

from tiered_routing.analysis import routing_stats
from tiered_routing.tier1 import languages

NORMALIZATIONS = ("row", "none")
_USAGE_STYLE = dict(
    aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest"
)


def usage_figure_size(
    num_languages: int, num_layers: int, num_experts: int
) -> tuple[float, float]:
  """Default (width, height) in inches of `plot_usage_heatmaps`."""
  panel_width = max(2.5, 0.22 * num_experts + 1.0)
  return (panel_width * num_layers + 1.5, max(3.0, 0.25 * num_languages + 1.5))


def js_figure_size(num_languages: int) -> tuple[float, float]:
  """Default (width, height) in inches of `plot_js_matrix`."""
  side = max(3.0, 0.3 * num_languages + 1.5)
  return (side + 1.0, side)


def _codes(codes: Sequence[str] | None, num_rows: int) -> tuple[str, ...]:
  codes = tuple(languages.CODES if codes is None else codes)
  if len(codes) != num_rows:
    raise ValueError(f"{len(codes)} language labels for {num_rows} rows")
  return codes


def save_png(fig: figure_lib.Figure, path, dpi: int) -> epath.Path:
  """Saves `fig` to `path`, written aside and renamed into place."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  backend_agg.FigureCanvasAgg(fig)
  # Written aside and renamed, so a reader never sees half a PNG.
  tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
  with tmp.open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  tmp.replace(path)
  return path


def _expert_ticks(ax, num_experts: int) -> None:
  step = max(1, num_experts // 16)
  ticks = np.arange(0, num_experts, step)
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(t) for t in ticks], fontsize=7)


def plot_usage_heatmaps(
    usage_NxMxE,
    path,
    codes: Sequence[str] | None = None,
    normalize: str = "row",
    title: str = "",
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> epath.Path:
  """One language x expert heatmap per MoE layer, side by side.

  Args:
    usage_NxMxE: counts or mass per (language, layer, expert), e.g.
      `RoutingCounts.assignments_NxMxE`.
    path: the PNG to write (parent folders are created).
    codes: row labels; default the 16 study languages.
    normalize: "row" shows p(expert | language) per layer (unrouted
      languages blank); "none" shows the raw values.
    title: figure title.
    figsize: inches; default `usage_figure_size(N, M, E)`.
    dpi: pixels per inch.

  Returns:
    The path written.
  """
  usage = np.asarray(usage_NxMxE, np.float64)
  if usage.ndim != 3:
    raise ValueError(
        f"usage must be [languages, layers, experts], got shape "
        f"{usage.shape}"
    )
  num_lang, num_layers, num_experts = usage.shape
  codes = _codes(codes, num_lang)
  panels = _usage_panels(usage, normalize)
  finite = [p[np.isfinite(p)] for p in panels]
  vmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
  fig = figure_lib.Figure(
      figsize=figsize or usage_figure_size(num_lang, num_layers, num_experts),
      layout="constrained",
  )
  axes = fig.subplots(1, num_layers, squeeze=False)[0]
  for y, (ax, panel) in enumerate(zip(axes, panels)):
    image = ax.imshow(np.ma.masked_invalid(panel), vmax=vmax, **_USAGE_STYLE)
    ax.set_title(f"layer {y}", fontsize=9)
    ax.set_xlabel("expert", fontsize=8)
    _expert_ticks(ax, num_experts)
    ax.set_yticks(np.arange(num_lang))
    ax.set_yticklabels(codes if y == 0 else [], fontsize=7)
  label = "p(expert | language)" if normalize == "row" else ""
  fig.colorbar(image, ax=list(axes), label=label)
  if title:
    fig.suptitle(title, fontsize=10)
  return save_png(fig, path, dpi)


def _usage_panels(usage_NxMxE: np.ndarray, normalize: str) -> list:
  """Per-layer [N, E] panels; "row" gives p(e | l), NaN for unrouted rows."""
  if normalize not in NORMALIZATIONS:
    raise ValueError(
        f"Unknown normalize {normalize!r}; allowed: {NORMALIZATIONS}"
    )
  panels = []
  for y in range(usage_NxMxE.shape[1]):
    layer_NxE = usage_NxMxE[:, y]
    if normalize == "row":
      routed_N = layer_NxE.sum(axis=1, keepdims=True) > 0
      layer_NxE = np.where(
          routed_N, routing_stats.expert_distribution(layer_NxE), np.nan
      )
    panels.append(layer_NxE)
  return panels


def plot_js_matrix(
    js_NxN,
    path,
    codes: Sequence[str] | None = None,
    title: str = "Jensen-Shannon divergence (bits)",
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> epath.Path:
  """Heatmap of a pairwise divergence matrix in [0, 1] bits.

  Args:
    js_NxN: e.g. `routing_stats.js_divergence_matrix(usage)`; NaN rows
      (unrouted languages) are left blank.
    path: the PNG to write.
    codes: row and column labels; default the 16 study languages.
    title: figure title.
    figsize: inches; default `js_figure_size(N)`.
    dpi: pixels per inch.

  Returns:
    The path written.
  """
  js = np.asarray(js_NxN, np.float64)
  if js.ndim != 2 or js.shape[0] != js.shape[1]:
    raise ValueError(f"js matrix must be square [N, N], got shape {js.shape}")
  codes = _codes(codes, js.shape[0])
  fig = figure_lib.Figure(
      figsize=figsize or js_figure_size(len(codes)), layout="constrained"
  )
  ax = fig.subplots()
  image = ax.imshow(
      np.ma.masked_invalid(js),
      cmap="magma_r",
      vmin=0.0,
      vmax=1.0,
      interpolation="nearest",
  )
  ticks = np.arange(len(codes))
  ax.set_xticks(ticks)
  ax.set_xticklabels(codes, fontsize=7, rotation=90)
  ax.set_yticks(ticks)
  ax.set_yticklabels(codes, fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax)
  return save_png(fig, path, dpi)
