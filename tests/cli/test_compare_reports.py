"""Tests for compare_reports on report tables the tests write."""

import csv

import pytest

from tiered_routing.cli import compare_reports

HEADER = ["config", "forget_language", "method", "seed", "mean_loss",
          "worst_language", "min_unigram_margin"]


def _write(directory, rows):
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / "originals.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(HEADER)
    writer.writerows(rows)
  return str(directory)


@pytest.fixture
def reports(tmp_path):
  a = _write(tmp_path / "a", [
      ["family1_none", "", "original", s, 3.5 + d, "zh", m]
      for s, d, m in ((0, 0.10, 0.6), (1, 0.12, "nan"), (2, 0.14, 0.5))
  ] + [["family4_none", "", "original", 0, 3.0, "zh", 0.7]])
  b = _write(tmp_path / "b", [
      ["family1_none", "", "original", s, 3.5, "ur", 0.4]
      for s in (0, 1, 2, 3)])
  return a, b


def test_paired_differences_over_the_common_seeds_golden(reports):
  a, b = (compare_reports.read_table(r, "originals") for r in reports)
  rows = compare_reports.compare(a, b)
  # family4_none is in report a only; worst_language is not a number.
  assert [(r["config"], r["metric"], r["seeds"]) for r in rows] == [
      ("family1_none", "mean_loss", 3),
      ("family1_none", "min_unigram_margin", 2)]  # Seed 1's NaN dropped.
  loss = rows[0]
  # Differences 0.10, 0.12, 0.14: mean 0.12, sd 0.02; the 95% t-interval's
  # half-width is t(0.975, 2) = 4.3027 times 0.02 / sqrt(3).
  assert loss["diff_mean"] == pytest.approx(0.12)
  assert loss["diff_ci95"] == pytest.approx(4.302653 * 0.02 / 3 ** 0.5)
  assert loss["a_mean"] == pytest.approx(3.62) and loss["b_mean"] == 3.5
  assert loss["resolved"]
  margin = rows[1]  # Differences 0.2 and 0.1: t(0.975, 1) = 12.706.
  assert margin["diff_mean"] == pytest.approx(0.15)
  assert margin["diff_ci95"] == pytest.approx(12.706205 * 0.05)
  assert not margin["resolved"]


def test_main_prints_and_writes_the_table(reports, tmp_path, parsed_flags,
                                          capsys):
  parsed_flags.report_a, parsed_flags.report_b = reports
  parsed_flags.metrics = ["mean_loss"]
  parsed_flags.output = str(tmp_path / "out" / "a_vs_b.csv")
  compare_reports.main([])
  assert "| family1_none |  | original | mean_loss | 3 | 3.620 | 3.500 | " \
      "+0.120 ± 0.050 | True |" in capsys.readouterr().out
  with open(tmp_path / "out" / "a_vs_b.csv", newline="") as f:
    written = list(csv.DictReader(f))
  assert [(r["metric"], r["seeds"], r["resolved"]) for r in written] == [
      ("mean_loss", "3", "True")]
  # t = 0.12 / (0.02 / sqrt(3)) on 2 degrees of freedom: p = 1 - t /
  # sqrt(t^2 + 2); one difference is its own family, so q = p.
  t = 0.12 / (0.02 / 3 ** 0.5)
  p = 1 - t / (t * t + 2) ** 0.5
  assert float(written[0]["p_value"]) == pytest.approx(p)
  assert float(written[0]["q_value"]) == pytest.approx(p)
  assert written[0]["resolved_fdr"] == "True"


def test_bad_input_is_named(reports, tmp_path, parsed_flags):
  a, b = (compare_reports.read_table(r, "originals") for r in reports)
  with pytest.raises(ValueError, match=r"Report a has no column \['bpb'\]"):
    compare_reports.compare(a, b, ["bpb"])
  with pytest.raises(ValueError, match=f"{tmp_path}/c/results_by_seed.csv "
                     "does not exist"):
    compare_reports.read_table(str(tmp_path / "c"), "results_by_seed")
  parsed_flags.report_a, parsed_flags.report_b = reports[0], None
  with pytest.raises(ValueError, match="--report_a and --report_b"):
    compare_reports.main([])


def _write_tables(directory, loss_of_ur):
  tables = {
      "per_language": (["config", "seed", "forget_language", "model",
                        "language", "loss"],
                       [["family1_none", s, "", "original", lang, 3.0]
                        for s in (0, 1) for lang in ("ur", "en")]),
      "results_by_seed": (["config", "method", "forget_language", "seed",
                           "forget_loss"],
                          [["family1_none", "ga", "ur", 0, loss_of_ur]]),
      "originals": (["config", "forget_language", "method", "seed",
                     "mean_loss"],
                    [["family1_none", "", "original", 0, 3.0]]),
  }
  directory.mkdir(parents=True)
  for table, (header, rows) in tables.items():
    with open(directory / f"{table}.csv", "w", newline="") as f:
      csv.writer(f).writerows([header] + rows)
  return str(directory)


def test_same_rows_counts_identical_rows_and_names_the_others(
    tmp_path, parsed_flags, capsys):
  a = _write_tables(tmp_path / "a", "5.25")
  b = _write_tables(tmp_path / "b", "5.250000000000001")
  # One more row in b only: not in both, so not counted.
  with open(tmp_path / "b" / "originals.csv", "a", newline="") as f:
    csv.writer(f).writerow(["family4_none", "", "original", 0, 2.9])
  counts = compare_reports.same_rows(a, b)
  assert [(r["table"], r["common"], r["identical"], r["differ"])
          for r in counts] == [
              ("per_language", 4, 4, ""),
              ("results_by_seed", 1, 0, "family1_none:ur:ga:0"),
              ("originals", 1, 1, "")]
  parsed_flags.report_a, parsed_flags.report_b = a, b
  parsed_flags.same_rows = True
  compare_reports.main([])
  assert "| results_by_seed | 1 | 0 | family1_none:ur:ga:0 |" in (
      capsys.readouterr().out)
