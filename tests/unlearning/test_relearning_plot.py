"""relearning.csv and the relearning plots, from hand-built result rows."""

import csv
import math

import numpy as np
import pytest

from tiered_routing.unlearning import relearning_plot
from tiered_routing.unlearning import sweep_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _row(method, seed, start, original, curves, run="family2_attention",
         forget="ur"):
  """A results_by_seed row: a few trade-off columns and the relearning
  columns of `curves` {attack: [nll, ...] or None (nothing to attack)}."""
  row = {
      "run": run, "forget_language": forget, "method": method, "seed": seed,
      "forget_gap_closed": 0.8, "retain_loss_delta": 0.01,
      "relearn_start_nll": start, "relearn_original_nll": original,
  }
  for attack, nll in curves.items():
    row[f"{attack}_steps"] = NAN if nll is None else 1.0
    row[f"{attack}_recovered"] = NAN
    if nll is not None:
      row[f"{attack}_curve"] = " ".join(f"{v:.4f}" for v in nll)
  return row


def _payloads(rows):
  """One payload per (seed), as `sweep_report.write_outputs` takes them."""
  payloads = []
  for seed in sorted({r["seed"] for r in rows}):
    payloads.append({
        "seed": seed,
        "rows": [r for r in rows if r["seed"] == seed],
        "languages": {
            "original": {"ur": {"loss": 3.0, "bpb": 1.0},
                         "hi": {"loss": 3.2, "bpb": 1.1}},
        },
    })
  return payloads


def test_attack_names_come_from_the_curve_columns():
  rows = [_row("ga", 0, 5.0, 3.0, {"relearn_8": [5.0], "relearn_256": [5.0],
                                   "relearn_related_hi": [5.0]}),
          _row("npo", 0, 5.0, 3.0, {"relearn_32": [5.0]})]
  names = relearning_plot.attack_names(rows)
  assert names == ["relearn_8", "relearn_256", "relearn_related_hi",
                   "relearn_32"]
  assert relearning_plot.largest_own_attack(names) == "relearn_256"
  assert relearning_plot.related_attacks(names) == ["relearn_related_hi"]
  assert relearning_plot.largest_own_attack(["relearn_related_hi"]) is None


def test_long_rows_golden_recovered_nan_gap_and_dropped_partition():
  rows = [
      # Gap 5 - 3 = 2: (5 - 5) / 2, (5 - 4) / 2, (5 - 3.5) / 2, (5 - 2) / 2.
      _row("ga", 0, 5.0, 3.0, {"relearn_8": [5.0, 4.0, 3.5, 2.0]}),
      # No gap (forgot nothing): NaN, the NLL kept.
      _row("mask", 0, 3.0, 3.0, {"relearn_8": [3.0, 2.9]}),
      # A dropped partition: NaN columns, no curve at all.
      _row("exact_drop", 0, NAN, 3.0, {"relearn_8": None}),
      # An empty curve cell (CSV) is no curve either.
      {**_row("exact_drop", 1, NAN, 3.0, {}), "relearn_8_curve": ""},
  ]
  out = relearning_plot.long_rows(rows)
  assert [tuple(r) for r in out] == [relearning_plot.LONG_COLUMNS] * 6
  ga = [r for r in out if r["method"] == "ga"]
  assert [r["step"] for r in ga] == [0, 1, 2, 3]
  assert [r["nll"] for r in ga] == [5.0, 4.0, 3.5, 2.0]
  np.testing.assert_allclose([r["recovered"] for r in ga],
                             [0.0, 0.5, 0.75, 1.5])
  assert {(r["run"], r["forget_language"], r["seed"], r["attack"])
          for r in ga} == {("family2_attention", "ur", 0, "relearn_8")}
  mask = [r for r in out if r["method"] == "mask"]
  assert [r["nll"] for r in mask] == [3.0, 2.9]
  assert all(math.isnan(r["recovered"]) for r in mask)
  assert not [r for r in out if r["method"] == "exact_drop"]


def test_recovered_gap_threshold():
  nll = np.array([3.0, 2.0])
  assert np.all(np.isnan(relearning_plot.recovered(3.0 + 1e-7, 3.0, nll)))
  assert np.all(np.isnan(relearning_plot.recovered(3.05, 3.0, nll)))
  assert np.all(np.isnan(relearning_plot.recovered(NAN, 3.0, nll)))
  np.testing.assert_allclose(
      relearning_plot.recovered(3.0, 2.0, nll), [0.0, 1.0])


def test_band_is_the_mean_and_t_interval_over_seeds():
  points = [{"step": s, "recovered": v}
            for s, vs in enumerate([(0.0, 0.2), (0.5, 0.7), (1.0, NAN)])
            for v in vs]
  steps, mean, low, high = relearning_plot._band(points)
  np.testing.assert_array_equal(steps, [0, 1, 2])
  np.testing.assert_allclose(mean, [0.1, 0.6, 1.0])
  half = 12.706204736 * 0.1  # t_{0.975, 1} * sd(0.0, 0.2) / sqrt(2).
  np.testing.assert_allclose(high[:2] - mean[:2], [half, half], rtol=1e-6)
  assert math.isnan(low[2]) and math.isnan(high[2])  # One finite seed.


def _two_seed_rows(run="family2_attention", forget="ur"):
  rows = []
  for seed, shift in ((0, 0.0), (1, 0.1)):
    rows.append(_row("ga", seed, 6.0, 3.0, {
        "relearn_8": [6.0, 5.5, 5.0], "relearn_32": [6.0, 4.6, 3.6 + shift],
        "relearn_related_hi": [6.0, 5.8, 5.6 - shift]}, run, forget))
    rows.append(_row("mask", seed, 5.0, 3.0, {
        "relearn_8": [3.0, 3.0, 3.0], "relearn_32": [3.0 + shift, 3.0, 2.9],
        "relearn_related_hi": [3.0, 3.0, 3.0]}, run, forget))
    rows.append(_row("exact_drop", seed, NAN, 3.0, {
        "relearn_8": None, "relearn_32": None, "relearn_related_hi": None},
        run, forget))
  return rows


def test_plots_are_png_files_of_the_largest_own_budget(tmp_path):
  points = relearning_plot.long_rows(_two_seed_rows())
  written = relearning_plot.write_plots(points, str(tmp_path), "smoke")
  assert sorted(p.name for p in written) == ["relearning.png",
                                             "relearning_related.png"]
  for name in ("relearning.png", "relearning_related.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_nothing_to_plot_writes_nothing(tmp_path):
  assert relearning_plot.plot_relearning([], tmp_path / "x.png") is None
  assert relearning_plot.write_plots([], str(tmp_path)) == []
  assert not list(tmp_path.iterdir())


def test_every_related_attack_gets_a_panel():
  points = [
      {"run": "r", "forget_language": "ur", "attack": a, "step": 0}
      for a in ("relearn_32", "relearn_related_hi", "relearn_related_fa")
  ] + [{"run": "r", "forget_language": "zh", "attack": "relearn_related_ja",
        "step": 0}]
  kept = relearning_plot.related_points(points)
  assert [(p["forget_language"], p["attack"]) for p in kept] == [
      ("ur", "relearn_related_hi"), ("ur", "relearn_related_fa"),
      ("zh", "relearn_related_ja")]
  assert relearning_plot._panels(kept) == [
      ("r", "ur", "relearn_related_hi"), ("r", "ur", "relearn_related_fa"),
      ("r", "zh", "relearn_related_ja")]


def test_write_outputs_writes_relearning_csv_and_plots(tmp_path):
  rows = _two_seed_rows()
  sweep_report.write_outputs(str(tmp_path), _payloads(rows), "smoke", {})
  with open(tmp_path / "relearning.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == tuple(
      sweep_report.CSV_NAMES.get(c, c) for c in relearning_plot.LONG_COLUMNS)
  assert tuple(table[0])[0] == "config"
  # 2 seeds x 2 attacked methods x 3 attacks x 3 points; exact_drop none.
  assert len(table) == 36
  assert {r["method"] for r in table} == {"ga", "mask"}
  ga32 = [r for r in table if (r["method"], r["seed"], r["attack"])
          == ("ga", "1", "relearn_32")]
  np.testing.assert_allclose([float(r["recovered"]) for r in ga32],
                             [0.0, 1.4 / 3, 2.3 / 3])
  for name in ("relearning.png", "relearning_related.png", "pareto.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
  with open(tmp_path / "results.csv", newline="") as f:
    assert not [c for c in next(csv.reader(f)) if c.endswith("_curve")]


@pytest.mark.parametrize("strip", ["columns", "all"])
def test_write_outputs_without_curves_writes_no_relearning_files(
    tmp_path, strip
):
  rows = []
  for row in _two_seed_rows():
    keep = (lambda k: not k.endswith("_curve")) if strip == "columns" else (
        lambda k: not k.startswith("relearn_"))
    rows.append({k: v for k, v in row.items() if keep(k)})
  sweep_report.write_outputs(str(tmp_path), _payloads(rows), "old", {})
  names = {p.name for p in tmp_path.iterdir()}
  assert {"results.csv", "results_by_seed.csv", "pareto.png"} <= names
  assert not {n for n in names if n.startswith("relearning")}
