"""What the Pareto plot draws, read back from its matplotlib artists."""

from matplotlib import figure as figure_lib
from matplotlib import patches
import numpy as np

from tiered_routing.unlearning import sweep_plot


def _axes():
  return figure_lib.Figure().subplots()


def test_front_rings_sit_on_the_points_not_at_the_cap():
  """A gap closed of 1.24 ranks as 1.0 (capped) but its ring is drawn at
  1.24, where its marker is; it used to be drawn at 1.0, on another point."""
  ax = _axes()
  x, y = np.array([0.5, 1.24]), np.array([0.01, 0.02])
  sweep_plot._draw_front(ax, x, y, np.ones(2, bool), (-0.1, 4.0), "-")
  rings = ax.collections[-1].get_offsets()
  np.testing.assert_allclose(np.asarray(rings), [[0.5, 0.01], [1.24, 0.02]])


def test_coinciding_markers_are_spread_and_others_kept():
  x = np.array([1.0, 1.0, 1.0, 0.3, 9.0])
  y = np.array([0.0, 0.0, 0.0, 0.1, 0.2])
  dodged = sweep_plot._dodged(x, y, (-0.1, 4.0), width=0.02)
  np.testing.assert_allclose(dodged, [0.98, 1.0, 1.02, 0.3, 4.0])


def test_negative_utility_losses_get_labelled_ticks():
  ax = _axes()
  ax.set_yscale("symlog", linthresh=0.05)
  ax.set_ylim(-0.07, 0.3)
  sweep_plot._y_ticks(ax)
  labels = [t.get_text() for t in ax.get_yticklabels()]
  assert labels == ["-0.05", "-0.02", "-0.01", "0", "0.01", "0.02", "0.05",
                    "0.1", "0.2"]


def test_legend_configurations_are_patches_not_method_shapes():
  ax = _axes()
  sweep_plot._legend(ax, sweep_plot._palette(2),
                     ["family1_none", "family4_all"], ["exact_retrain", "mask"])
  handles = ax.get_legend().legend_handles
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  kinds = dict(zip(labels, handles))
  assert isinstance(kinds["family1_none"], patches.Patch)
  assert not isinstance(kinds["mask"], patches.Patch)
  assert kinds["Pareto front, approximate methods"].get_marker() == "o"
