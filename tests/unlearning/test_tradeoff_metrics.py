"""Tests for tiered_routing.unlearning.metrics."""

import io
import math

import pytest

from tiered_routing.unlearning import tradeoff_metrics

# ur's family (west_asian) also has ar, fa, kk; hi and en are other families.
ORIGINAL = {
    "ur": {"loss": 2.0, "bpb": 1.0},
    "ar": {"loss": 3.0, "bpb": 1.5},
    "fa": {"loss": 2.5, "bpb": 1.2},
    "hi": {"loss": 1.0, "bpb": 0.5},
    "en": {"loss": 4.0, "bpb": 2.0},
}
UNLEARNED = {
    "ur": {"loss": 3.5, "bpb": 1.8},
    "ar": {"loss": 3.5, "bpb": 1.7},
    "fa": {"loss": 2.5, "bpb": 1.2},
    "hi": {"loss": 1.5, "bpb": 0.5},
    "en": {"loss": 4.0, "bpb": 2.1},
}
REFERENCE = {"ur": {"loss": 5.0, "bpb": 2.5}}


def test_forget_quality_golden():
  q = tradeoff_metrics.forget_quality("ur", UNLEARNED, ORIGINAL, REFERENCE)
  assert q["forget_loss"] == 3.5
  assert q["forget_loss_original"] == 2.0
  assert q["forget_loss_delta"] == 1.5
  assert q["forget_bpb_delta"] == pytest.approx(0.8)
  assert q["forget_loss_reference"] == 5.0
  assert q["forget_gap_closed"] == pytest.approx(0.5)  # 1.5 / 3.0
  no_ref = tradeoff_metrics.forget_quality("ur", UNLEARNED, ORIGINAL)
  assert set(no_ref) == set(q)
  assert math.isnan(no_ref["forget_gap_closed"])
  assert math.isnan(no_ref["forget_loss_reference"])
  same = tradeoff_metrics.forget_quality(
      "ur", UNLEARNED, ORIGINAL, {"ur": {"loss": 2.0, "bpb": 1.0}}
  )
  assert math.isnan(same["forget_gap_closed"])


def test_gap_is_closed_toward_uniform_when_the_reference_is_worse():
  # Reference 5.0 nats; a uniform distribution scores 4.0: forgetting
  # needs no more than knowing nothing, so the gap is (3.5 - 2) / (4 - 2).
  q = tradeoff_metrics.forget_quality(
      "ur", UNLEARNED, ORIGINAL, REFERENCE, uniform_loss=4.0
  )
  assert q["forget_loss_target"] == 4.0
  assert q["reference_worse_than_uniform"] == 1.0
  assert q["forget_gap_closed"] == pytest.approx(0.75)
  better = tradeoff_metrics.forget_quality(
      "ur", UNLEARNED, ORIGINAL, REFERENCE, uniform_loss=8.0
  )
  assert better["forget_loss_target"] == 5.0
  assert better["reference_worse_than_uniform"] == 0.0
  assert better["forget_gap_closed"] == pytest.approx(0.5)


def test_utility_splits_the_forget_partition_from_the_rest():
  # The forget language's partition holds ar and hi; fa and en are outside.
  u = tradeoff_metrics.utility(
      "ur", UNLEARNED, ORIGINAL, partition=("ar", "ur", "hi")
  )
  assert u["inside_loss"] == pytest.approx((3.5 + 1.5) / 2)
  assert u["inside_loss_delta"] == pytest.approx(0.5)
  assert u["outside_loss"] == pytest.approx((2.5 + 4.0) / 2)
  assert u["outside_loss_delta"] == pytest.approx(0.0)
  one_partition = tradeoff_metrics.utility(
      "ur", UNLEARNED, ORIGINAL, partition=tuple(UNLEARNED)
  )
  assert one_partition["inside_loss"] == one_partition["retain_loss"]
  assert math.isnan(one_partition["outside_loss"])


def test_utility_golden():
  u = tradeoff_metrics.utility("ur", UNLEARNED, ORIGINAL)
  assert u["retain_loss"] == pytest.approx((3.5 + 2.5 + 1.5 + 4.0) / 4)
  assert u["retain_loss_delta"] == pytest.approx((0.5 + 0 + 0.5 + 0) / 4)
  assert u["family_loss"] == pytest.approx(3.0)  # ar, fa
  assert u["family_loss_delta"] == pytest.approx(0.25)
  assert u["family_bpb_delta"] == pytest.approx(0.1)
  assert u["other_loss"] == pytest.approx(2.75)  # hi, en
  assert u["other_bpb_delta"] == pytest.approx(0.05)
  alone = tradeoff_metrics.utility(
      "ur", {"ur": UNLEARNED["ur"], "en": UNLEARNED["en"]}
  )
  assert set(alone) == set(u)
  assert math.isnan(alone["family_loss"])
  assert math.isnan(alone["retain_loss_delta"])
  assert alone["other_bpb"] == 2.1


def test_validation_names_bad_values():
  with pytest.raises(ValueError, match="'xx'"):
    tradeoff_metrics.forget_quality("xx", UNLEARNED, ORIGINAL)
  with pytest.raises(ValueError, match=r"\['ur'\]\['loss'\] = nan"):
    tradeoff_metrics.forget_quality(
        "ur", {**UNLEARNED, "ur": {"loss": float("nan"), "bpb": 1.0}}, ORIGINAL
    )
  with pytest.raises(ValueError, match="no 'bpb'"):
    tradeoff_metrics.utility("ur", {"en": {"loss": 1.0}})
  with pytest.raises(ValueError, match="no result for language 'ur'"):
    tradeoff_metrics.forget_quality("ur", UNLEARNED, {"en": ORIGINAL["en"]})
  with pytest.raises(ValueError, match="retained languages"):
    tradeoff_metrics.utility("ur", {"ur": UNLEARNED["ur"]})
  with pytest.raises(ValueError, match="no result for language 'hi'"):
    tradeoff_metrics.utility("ur", UNLEARNED, {"ar": ORIGINAL["ar"]})
  with pytest.raises(ValueError, match="steps=-1"):
    tradeoff_metrics.UnlearningCost(steps=-1)


def test_cost_flops_golden():
  assert tradeoff_metrics.training_flops(1_000, 10) == 60_000
  assert tradeoff_metrics.forward_flops(1_000, 10) == 20_000
  cost = tradeoff_metrics.UnlearningCost(
      steps=5, train_tokens=100, forward_tokens=50, active_params=10
  )
  assert cost.flops == 6 * 10 * 100 + 2 * 10 * 50
  assert cost.as_dict()["flops"] == 7_000


def test_result_row_and_csv():
  q = tradeoff_metrics.forget_quality("ur", UNLEARNED, ORIGINAL, REFERENCE)
  u = tradeoff_metrics.utility("ur", UNLEARNED, ORIGINAL)
  r = tradeoff_metrics.UnlearningResult(
      "family4_none",
      "npo",
      "ur",
      q,
      u,
      tradeoff_metrics.UnlearningCost(steps=2, train_tokens=8, active_params=3),
      extra={"sharing": "none", "npo_beta": 0.1},
  )
  row = r.to_row()
  assert list(row)[:4] == ["run", "method", "forget_language", "forget_loss"]
  assert row["flops"] == 144.0 and row["sharing"] == "none"
  assert len(row) == 3 + len(q) + len(u) + 5 + 2
  buf = io.StringIO()
  masking = tradeoff_metrics.UnlearningResult(
      "family4_none", "expert_masking", "ur", q, u
  )
  tradeoff_metrics.write_csv([r, masking], buf)
  lines = buf.getvalue().splitlines()
  assert lines[0].split(",")[:3] == ["run", "method", "forget_language"]
  assert lines[1].startswith("family4_none,npo,ur,3.5,2.0,1.5,")
  assert lines[2].endswith(",,")  # no extra columns for masking
  with pytest.raises(ValueError, match="'steps' appears twice"):
    tradeoff_metrics.UnlearningResult(
        "a", "b", "ur", q, u, extra={"steps": 1}
    ).to_row()
  with pytest.raises(ValueError, match="method must be"):
    tradeoff_metrics.UnlearningResult("a", "", "ur", q, u)
