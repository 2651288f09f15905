"""Relearning attack summaries: golden values by hand."""

import math

import numpy as np

from tiered_routing.unlearning import audit_sets
from tiered_routing.unlearning import relearning


def test_summary_first_step_at_half_the_gap():
  # Forgotten gap 8 - 6 = 2: half is recovered at NLL 7, after step 2.
  out = relearning.summary("r", 8.0, 6.0, np.array([8.0, 7.5, 6.9, 6.5]), 10)
  assert out == {"r_steps": 2.0, "r_tokens": 20.0, "r_recovered": 0.75,
                 "r_final_nll": 6.5}


def test_summary_capped_and_immediate():
  never = relearning.summary("r", 8.0, 6.0, np.array([8.0, 7.9, 7.8]), 10)
  assert never["r_steps"] == 3.0 and never["r_tokens"] == 20.0
  np.testing.assert_allclose(never["r_recovered"], 0.1)
  # The mask method: its weights, unmasked, are the original's (step 0).
  mask = relearning.summary("r", 8.0, 6.0, np.array([6.0, 5.9]), 10)
  assert mask["r_steps"] == 0.0 and mask["r_tokens"] == 0.0
  # Nothing (or next to nothing: 0.05 nats) was forgotten: no gap to
  # recover, no steps to half of it; the final NLL is still reported.
  for start in (6.0, 6.05):
    out = relearning.summary("r", start, 6.0, np.array([start, 5.9]), 10)
    assert all(math.isnan(out[f"r_{k}"])
               for k in ("recovered", "steps", "tokens")), out
    assert out["r_final_nll"] == 5.9
  assert relearning.MIN_GAP_NATS == 0.1


def test_nan_summary_and_related_languages():
  assert all(math.isnan(v) for v in relearning.nan_summary("r").values())
  assert audit_sets.related_languages("ur") == ("hi", "fa")
  assert audit_sets.related_languages("si") == ("hi",)
