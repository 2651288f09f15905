"""Intervals over seeds and paired differences: values built by hand."""

import math

import numpy as np
import pytest

from tiered_routing.unlearning import sweep_statistics as st


def _row(seed, method, value, run="family4_none", **extra):
  return {
      "run": run,
      "forget_language": "ur",
      "method": method,
      "seed": seed,
      "retain_loss_delta": value,
      **extra,
  }


def test_mean_ci95_is_the_student_t_interval():
  mean, half = st.mean_ci95([1.0, 2.0, 3.0])
  # sd = 1, sem = 1 / sqrt(3), t_{0.975, 2} = 4.302653.
  assert mean == 2.0
  assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
  assert math.isnan(st.mean_ci95([5.0])[1])
  assert st.mean_ci95([4.0, 4.0, 4.0]) == (4.0, 0.0)


def test_aggregate_keeps_constants_and_joins_what_varies():
  rows = [
      _row(0, "npo", 0.1, reached=True, experts="L0:1"),
      _row(1, "npo", 0.3, reached=False, experts="L0:2"),
      _row(2, "npo", 0.2, reached=True, experts="L0:1"),
      _row(0, "ga", 0.5, reached=True, experts="-"),
  ]
  out = {r["method"]: r for r in st.aggregate(rows)}
  npo = out["npo"]
  assert npo["seeds"] == 3
  assert npo["retain_loss_delta_mean"] == pytest.approx(0.2)
  assert npo["retain_loss_delta_ci95"] == pytest.approx(
      4.302653 * 0.1 / math.sqrt(3), rel=1e-6
  )
  assert npo["reached_mean"] == pytest.approx(2 / 3)
  assert npo["experts"] == "L0:1|L0:2"
  assert out["ga"]["seeds"] == 1 and math.isnan(
      out["ga"]["retain_loss_delta_ci95"]
  )


def test_paired_difference_pairs_by_seed():
  # b is a + 1 on every seed (plus a shared per-seed offset): the paired
  # interval is exactly 0 wide although the rows' own intervals are wide.
  offsets = [0.0, 5.0, -3.0]
  rows = [_row(s, "trace", o) for s, o in enumerate(offsets)]
  rows += [_row(s, "npo_retain", o + 1.0) for s, o in enumerate(offsets)]
  key = {"run": "family4_none", "forget_language": "ur"}
  diff = st.paired_difference(
      rows, {**key, "method": "trace"}, {**key, "method": "npo_retain"},
      "retain_loss_delta",
  )
  assert diff == {
      "seeds": 3, "diff_mean": -1.0, "diff_ci95": 0.0, "resolved": True,
      "p_value": 0.0,  # The same difference on every seed: t is infinite.
  }


def test_unresolved_when_the_interval_covers_zero():
  rows = [_row(s, "a", v) for s, v in enumerate([0.0, 0.0, 0.0])]
  rows += [_row(s, "b", v) for s, v in enumerate([0.1, -0.1, 0.05])]
  key = {"run": "family4_none", "forget_language": "ur"}
  diff = st.paired_difference(
      rows, {**key, "method": "a"}, {**key, "method": "b"}, "retain_loss_delta"
  )
  assert diff["seeds"] == 3 and not diff["resolved"]
  assert diff["diff_mean"] == pytest.approx(-0.05 / 3)
  assert diff["p_value"] > 0.05


def test_rows_must_name_their_seed_once():
  with pytest.raises(ValueError, match=r"lacks the columns \['seed'\]"):
    st.aggregate([{"run": "r", "forget_language": "ur", "method": "m"}])
  with pytest.raises(ValueError, match=r"repeat a seed: \[0, 0\]"):
    st.aggregate([_row(0, "m", 1.0), _row(0, "m", 2.0)])
  with pytest.raises(ValueError, match="No rows for"):
    st.paired_difference(
        [_row(0, "m", 1.0)],
        {"run": "x", "forget_language": "ur", "method": "m"},
        {"run": "family4_none", "forget_language": "ur", "method": "m"},
        "retain_loss_delta",
    )


def test_numpy_scalars_count_as_numbers():
  rows = [_row(s, "m", np.float32(s)) for s in range(3)]
  assert st.aggregate(rows)[0]["retain_loss_delta_mean"] == 1.0


def test_paired_t_p_value_golden():
  # Differences 1, 2, 3: t = 2 / (1 / sqrt(3)) = sqrt(12) on 2 degrees of
  # freedom, where the two-sided p is 1 - t / sqrt(t^2 + 2) in closed form.
  t = math.sqrt(12.0)
  assert st.paired_t_p_value([1.0, 2.0, 3.0]) == pytest.approx(
      1 - t / math.sqrt(t * t + 2), rel=1e-9)
  assert st.paired_t_p_value([0.5, 0.5, 0.5]) == 0.0
  assert st.paired_t_p_value([0.0, 0.0, 0.0]) == 1.0
  assert math.isnan(st.paired_t_p_value([1.0]))
  assert math.isnan(st.paired_t_p_value([1.0, float("nan"), 2.0]))


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_p_value_is_dual_to_the_interval_and_recoverable_from_it(seeds):
  rng = np.random.default_rng(seeds)
  for _ in range(200):
    diffs = rng.normal(rng.normal(0, 1), rng.uniform(0.1, 2), size=seeds)
    mean, half = st.mean_ci95(diffs)
    p = st.paired_t_p_value(diffs)
    assert (p < 0.05) == st.excludes_zero(mean, half)
    assert st.p_value_of_interval(mean, half, seeds) == pytest.approx(
        p, rel=1e-9, abs=1e-15)
  assert st.p_value_of_interval(-1.0, 0.0, 3) == 0.0
  assert math.isnan(st.p_value_of_interval(1.0, float("nan"), 1))


def test_benjamini_hochberg_golden():
  # m = 4 finite p-values; sorted 0.01, 0.03, 0.04, 0.5 scale by m / rank
  # to 0.04, 0.06, 0.0533, 0.5; the running minimum from the largest down
  # gives 0.04, 0.0533, 0.0533, 0.5. Three p-values are under 0.05, one q.
  q = st.benjamini_hochberg([0.01, 0.04, 0.03, 0.5, float("nan")])
  assert q[:4] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
  assert math.isnan(q[4])
  assert st.benjamini_hochberg([0.9, 0.8]) == [0.9, 0.9]
  assert st.benjamini_hochberg([]) == []


def test_each_family_is_corrected_on_its_own():
  pairs = [{"kind": k, "p_value": p} for k, p in
           (("a", 0.01), ("a", 0.04), ("b", 0.03), ("b", 0.5))]
  whole = st.with_false_discovery_rate(pairs)
  assert [r["q_value"] for r in whole] == pytest.approx(
      [0.04, 0.16 / 3, 0.16 / 3, 0.5])
  assert [r["resolved_fdr"] for r in whole] == [True, False, False, False]
  kinds = st.with_false_discovery_rate(whole, family="kind", suffix="_k")
  # Family a: 0.01 * 2 / 1 = 0.02, 0.04 * 2 / 2 = 0.04; family b: 0.06, 0.5.
  assert [r["q_value_k"] for r in kinds] == pytest.approx(
      [0.02, 0.04, 0.06, 0.5])
  assert [r["resolved_fdr_k"] for r in kinds] == [True, True, False, False]
  assert kinds[0]["q_value"] == whole[0]["q_value"]  # Earlier columns kept.


def test_planted_differences_hold_and_chance_ones_do_not():
  """Among 195 differences with no effect, about 10 intervals exclude zero
  by chance; at 5% FDR the 5 planted effects hold and at most one of the
  chance ones does (this generator's draw gives one)."""
  rng = np.random.default_rng(0)
  planted = [rng.normal(1.0, 0.1, size=5) for _ in range(5)]
  null = [rng.normal(0.0, 1.0, size=5) for _ in range(195)]
  pairs = [{"p_value": st.paired_t_p_value(d), "planted": i < 5}
           for i, d in enumerate(planted + null)]
  chance = sum(r["p_value"] < 0.05 for r in pairs if not r["planted"])
  assert 4 <= chance <= 20
  held = [r["planted"] for r in st.with_false_discovery_rate(pairs)
          if r["resolved_fdr"]]
  assert held[:5] == [True] * 5 and len(held) <= 6
