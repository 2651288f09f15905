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
      "seeds": 3, "diff_mean": -1.0, "diff_ci95": 0.0, "resolved": True
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
