"""Tests for false_discoveries on comparison tables the tests write."""

import csv
import math

import pytest

from tiered_routing.cli import false_discoveries

HEADER = ["kind", "forget_language", "a", "b", "metric", "seeds",
          "diff_mean", "diff_ci95", "resolved"]
T_975_2 = 4.302652729749464  # t_{0.975} on 2 degrees of freedom.


def _p(t):
  """Two-sided p of t on 2 degrees of freedom, in closed form."""
  return 1 - abs(t) / math.sqrt(t * t + 2)


def _row(kind, metric, t):
  """A row written before p-values were recorded: mean 1 and the
  half-width of a 3-seed 95% t-interval whose t statistic is `t`."""
  return [kind, "ur", "family4_none:trace", "family4_none:npo_retain",
          metric, 3, 1.0, T_975_2 / t, t > T_975_2]


@pytest.fixture
def legacy_table(tmp_path):
  path = tmp_path / "comparisons.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(HEADER)
    # p = 0.00226, 0.0150, 0.0385, 0.0943: three intervals exclude zero.
    writer.writerows([_row("method vs its baseline", "m1", 20.0),
                      _row("method vs its baseline", "m2", 8.0),
                      _row("configuration", "m3", 5.0),
                      _row("configuration", "m4", 3.0)])
  return path


def test_p_values_are_recovered_and_corrected_golden(legacy_table):
  pairs = false_discoveries.read_pairs(str(legacy_table))
  p = [_p(t) for t in (20.0, 8.0, 5.0, 3.0)]
  assert [r["p_value"] for r in pairs] == pytest.approx(p, rel=1e-9)
  assert [r["resolved"] for r in pairs] == [True, True, True, False]
  # Whole table, m = 4: q = min over the larger of 4 p / rank.
  whole = [4 * p[0], 2 * p[1], 4 / 3 * p[2], p[3]]
  assert [r["q_value"] for r in pairs] == pytest.approx(whole, rel=1e-9)
  assert [r["resolved_fdr"] for r in pairs] == [True, True, False, False]
  # Each kind its own family of 2.
  in_kind = [2 * p[0], p[1], 2 * p[2], p[3]]
  assert [r["q_value_in_kind"] for r in pairs] == pytest.approx(
      in_kind, rel=1e-9)
  assert [r["resolved_fdr_in_kind"] for r in pairs] == [
      True, True, False, False]


def test_main_prints_the_summary_and_writes_the_table(
    legacy_table, tmp_path, parsed_flags, capsys):
  parsed_flags.comparisons = str(legacy_table)
  parsed_flags.output_csv = str(tmp_path / "out" / "fdr.csv")
  false_discoveries.main([])
  out = capsys.readouterr().out
  assert out.startswith(
      "4 paired differences over 2 or more seeds: 3 resolved (the 95% "
      "interval excludes zero), where about 0.2 would be by chance alone")
  assert ("2 hold over the whole table; with each kind of question its "
          "own family: method vs its baseline 2 of 2, configuration 0 of 2."
          in out)
  assert "| m1 |" in out and "| m2 |" in out and "| m3 |" not in out
  with open(tmp_path / "out" / "fdr.csv", newline="") as f:
    written = list(csv.DictReader(f))
  assert [r["resolved_fdr"] for r in written] == [
      "True", "True", "False", "False"]
  parsed_flags.all = True
  false_discoveries.main([])
  assert "| m4 |" in capsys.readouterr().out


def test_bad_input_is_named_and_nothing_is_overwritten(
    legacy_table, tmp_path, parsed_flags):
  before = legacy_table.read_text()
  parsed_flags.comparisons = str(legacy_table)
  parsed_flags.output_csv = str(legacy_table)
  with pytest.raises(ValueError, match="is the table being read"):
    false_discoveries.main([])
  assert legacy_table.read_text() == before
  parsed_flags.output_csv = None
  parsed_flags.comparisons = str(tmp_path / "missing.csv")
  with pytest.raises(ValueError, match="missing.csv' is not a file"):
    false_discoveries.main([])
  other = tmp_path / "originals.csv"
  other.write_text("config,seed,mean_loss\nfamily1_none,0,3.5\n")
  parsed_flags.comparisons = str(other)
  with pytest.raises(ValueError, match=r"lacks the columns \['seeds', "
                     r"'diff_mean', 'diff_ci95', 'resolved'\]"):
    false_discoveries.main([])
  other.write_text("seeds,diff_mean,diff_ci95,resolved\nthree,1.0,0.5,True\n")
  with pytest.raises(ValueError, match="seeds='three' in .* is not a count"):
    false_discoveries.main([])
