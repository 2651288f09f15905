"""The training-curve PNG plots exactly the logged series."""

import numpy as np
import pytest

from tiered_routing.analysis import training_curves


def _records():
  """Three log steps; per-language values for two languages; two MoE
  layers' dropped fractions; step 20 lacks 'cross_entropy/zh'."""
  records = {}
  for step, loss in ((10, 6.0), (20, 4.0), (30, 3.5)):
    records[step] = {
        "loss": loss, "cross_entropy": loss - 0.1,
        "learning_rate": 1e-3 * step,
        "cross_entropy/ur": loss - 1.0,
        "router/decoder/layers_1/moe/dropped_fraction": 0.2,
        "router/decoder/layers_3/moe/dropped_fraction": 0.4,
        "router/decoder/layers_1/moe/expert_usage_E": [0.5, 0.5],
    }
    if step != 20:
      records[step]["cross_entropy/zh"] = loss + 1.0
  return records


def test_curves_are_the_logged_values_in_step_order():
  series = training_curves.curves(_records())
  steps, values = series["loss"]
  np.testing.assert_array_equal(steps, [10, 20, 30])
  np.testing.assert_array_equal(values, [6.0, 4.0, 3.5])
  np.testing.assert_array_equal(series["cross_entropy/zh"][0], [10, 30])
  np.testing.assert_allclose(series["dropped_fraction"][1], [0.3] * 3)
  assert "cross_entropy/de" not in series
  assert sorted(series) == sorted([
      "loss", "cross_entropy", "learning_rate", "cross_entropy/ur",
      "cross_entropy/zh", "dropped_fraction"])


def test_png_written_and_a_run_without_loss_refused(tmp_path):
  path = training_curves.plot_training_curves(
      _records(), tmp_path / "train" / "curves.png", title="run")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="No 'loss'"):
    training_curves.plot_training_curves({1: {"lr": 1.0}}, tmp_path / "x.png")
