"""Tests for the rewrite_report binary on a sweep directory the test writes."""

import csv
import json

import pytest

from tiered_routing.cli import rewrite_report
from tiered_routing.unlearning import sweep_jobs


def _payload(seed, version=sweep_jobs.RESULT_VERSION):
  rows = [
      {"run": "family2_none", "forget_language": "ur", "method": m,
       "seed": seed, "forget_gap_closed": gap + 0.01 * seed,
       "retain_loss_delta": 0.1 * gap}
      for m, gap in (("exact_retrain", 1.0), ("ga", 0.9))
  ]
  results = {"ur": {"loss": 5.0, "bpb": 1.0, "tokens": 10, "bytes": 30},
             "de": {"loss": 4.0, "bpb": 1.0, "tokens": 10, "bytes": 30}}
  return {"version": version, "seed": seed, "rows": rows,
          "languages": {"original": results, "ga": results}, "wall_s": 1.0}


def _write(path, payload):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload))


@pytest.fixture
def sweep_dir(tmp_path):
  out = tmp_path / "sweep"
  runs = out / "runs" / "family2_none"
  for seed in (0, 1):
    _write(runs / f"seed{seed}" / "ur" / "result.json", _payload(seed))
  # An older version's unit is left out (the sweep would redo it).
  _write(runs / "seed2" / "ur" / "result.json", _payload(2, version=1))
  _write(runs / "seed0" / "sequential" / "result.json", {
      "version": sweep_jobs.RESULT_VERSION, "seed": 0, "rows": [],
      "languages": {}, "sequential": [
          {"run": "family2_none", "forget_language": "ur", "method": "exact",
           "seed": 0, "removals": 1, "forget_gap_closed": 1.0,
           "retain_loss_delta_vs_exact": 0.0, "cumulative_flops": 1e9}]})
  (out / "sweep.json").write_text(json.dumps({
      "configurations": ["family2_none"],
      "gin_config": "tradeoff.make_sweep.source = 'sample'\n"}))
  (out / "baselines.json").write_text(json.dumps(
      {"ur": {"unigram_loss": 6.0, "bigram_loss": 5.5}}))
  return out


def _write_report(sweep_dir, report, parsed_flags):
  """rewrite_report --output_dir=sweep_dir --report_dir=report; report."""
  parsed_flags.output_dir = str(sweep_dir)
  parsed_flags.report_dir = str(report)
  rewrite_report.main([])
  return report


def test_rewrites_the_report_of_the_current_units(
    sweep_dir, tmp_path, parsed_flags):
  report = _write_report(sweep_dir, tmp_path / "report", parsed_flags)
  with open(report / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["seeds"]) for r in rows] == [
      ("exact_retrain", "2"), ("ga", "2")]
  assert float(rows[1]["forget_gap_closed_mean"]) == pytest.approx(0.905)
  assert (report / "results.md").read_text().startswith(
      "# Forgetting ur: sample data, 2 seeds")
  assert (report / "sequential.csv").exists()
  assert (report / "pareto.png").exists()
  assert not (sweep_dir / "results.csv").exists()  # Only --report_dir.


def test_a_directory_that_is_not_a_sweep_is_named(tmp_path, parsed_flags):
  parsed_flags.output_dir = str(tmp_path)
  with pytest.raises(ValueError, match=f"{tmp_path}/sweep.json does not"):
    rewrite_report.main([])


def test_a_snapshot_carries_the_records_and_rebuilds_its_own_report(
    sweep_dir, tmp_path, parsed_flags):
  report = _write_report(sweep_dir, tmp_path / "report", parsed_flags)
  for name in ("sweep.json", "baselines.json", "runs/family2_none/seed0/ur/"
               "result.json", "runs/family2_none/seed0/sequential/result.json"):
    assert (report / name).read_bytes() == (sweep_dir / name).read_bytes()
  # An older version's unit is not a record of this sweep.
  assert not (report / "runs" / "family2_none" / "seed2").exists()
  first = (report / "results.csv").read_text()
  (report / "results.csv").unlink()
  parsed_flags.output_dir, parsed_flags.report_dir = str(report), None
  rewrite_report.main([])
  assert (report / "results.csv").read_text() == first


def test_a_snapshot_unit_missing_from_the_sweep_stops_before_writing(
    sweep_dir, tmp_path, parsed_flags):
  report = _write_report(sweep_dir, tmp_path / "report", parsed_flags)
  before = (report / "results.csv").read_text()
  (sweep_dir / "runs" / "family2_none" / "seed1" / "ur" / "result.json").unlink()
  with pytest.raises(ValueError, match=r"1 finished unit\(s\) that .* lacks "
                     r"\(runs/family2_none/seed1/ur/result.json\)"):
    rewrite_report.main([])
  assert (report / "results.csv").read_text() == before
  assert (report / "runs/family2_none/seed1/ur/result.json").exists()
