"""Routing heatmaps are valid PNGs of the requested size."""

import struct

from matplotlib import image as mpl_image
import numpy as np
import pytest

from tiered_routing.analysis import plots
from tiered_routing.analysis import routing_stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
  data = open(path, "rb").read()
  assert data[:8] == PNG_SIGNATURE
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def _planted_usage(num_layers=2, num_experts=32):
  """16 languages, each on its own two experts in every layer."""
  usage = np.zeros((16, num_layers, num_experts))
  for i in range(16):
    usage[i, :, 2 * i : 2 * i + 2] = 5.0
  usage[3] = 0.0  # one language absent from the eval set
  return usage


def test_usage_heatmaps_png(tmp_path):
  usage = _planted_usage()
  path = plots.plot_usage_heatmaps(
      usage, tmp_path / "sub" / "usage.png", title="planted", dpi=50
  )
  width, height = plots.usage_figure_size(16, 2, 32)
  assert _png_size(path) == (round(width * 50), round(height * 50))
  pixels = mpl_image.imread(path)
  assert pixels.shape == (round(height * 50), round(width * 50), 4)
  assert pixels[..., :3].std() > 0.05  # not a blank canvas
  other = plots.plot_usage_heatmaps(
      usage[:, :, ::-1], tmp_path / "rev.png", title="planted", dpi=50
  )
  assert not np.array_equal(mpl_image.imread(other), pixels)
  raw = plots.plot_usage_heatmaps(
      usage, tmp_path / "raw.png", normalize="none", figsize=(6, 4), dpi=40
  )
  assert _png_size(raw) == (240, 160)


def test_js_matrix_png(tmp_path):
  js = routing_stats.js_divergence_matrix(_planted_usage()[:, 0])
  path = plots.plot_js_matrix(js, tmp_path / "js.png", figsize=(5, 4), dpi=60)
  assert _png_size(path) == (300, 240)
  codes = [f"l{i}" for i in range(3)]
  path = plots.plot_js_matrix(np.eye(3), tmp_path / "js3.png", codes=codes)
  width, height = plots.js_figure_size(3)
  assert _png_size(path) == (round(width * 100), round(height * 100))


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match=r"\[languages, layers, experts\]"):
    plots.plot_usage_heatmaps(np.ones((16, 4)), tmp_path / "x.png")
  with pytest.raises(ValueError, match="Unknown normalize 'col'"):
    plots.plot_usage_heatmaps(
        np.ones((16, 1, 4)), tmp_path / "x.png", normalize="col"
    )
  with pytest.raises(ValueError, match="3 language labels for 16 rows"):
    plots.plot_js_matrix(np.eye(16), tmp_path / "x.png", codes=["a"] * 3)
  with pytest.raises(ValueError, match="square"):
    plots.plot_js_matrix(np.ones((2, 3)), tmp_path / "x.png")
