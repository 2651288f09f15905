"""The sweep's derived tables: golden values built by hand."""

import numpy as np
import pytest

from tiered_routing.unlearning import sweep_progress
from tiered_routing.unlearning import sweep_statistics
from tiered_routing.unlearning import sweep_tables

BASELINES = {
    "ur": {"unigram_loss": 5.0, "bigram_loss": 4.0},
    "en": {"unigram_loss": 6.0, "bigram_loss": 4.5},
}


def _payload(run, seed, forget, original, reference, method=("ga", {})):
  name, results = method
  return {
      "seed": seed,
      "rows": [{"run": run, "forget_language": forget, "seed": seed}],
      "languages": {
          "original": original,
          "reference": reference,
          name: results,
      },
  }


def _langs(ur, en):
  return {"ur": {"loss": ur, "bpb": ur / 2}, "en": {"loss": en, "bpb": en / 2}}


def test_per_language_rows_list_the_original_once_per_seed():
  payloads = [
      _payload("family4_none", 0, "ur", _langs(4.0, 5.0), _langs(6.0, 5.0)),
      _payload("family4_none", 0, "de", _langs(4.0, 5.0), _langs(4.0, 5.1)),
  ]
  rows = sweep_tables.per_language_rows(payloads, BASELINES)
  originals = [r for r in rows if r["model"] == "original"]
  assert len(originals) == 2  # Two languages, once for both forget langs.
  assert {r["forget_language"] for r in originals} == {""}
  ref = [r for r in rows if r["model"] == "reference"]
  assert [(r["forget_language"], r["language"]) for r in ref] == [
      ("ur", "ur"), ("ur", "en"), ("de", "ur"), ("de", "en")
  ]
  assert originals[0]["unigram_loss"] == 5.0
  assert originals[1]["bigram_loss"] == 4.5


def test_original_rows_give_the_margins_over_the_baselines():
  payloads = [
      _payload("family4_none", 0, "ur", _langs(4.0, 5.2), _langs(6.0, 5.0))
  ]
  per_language = sweep_tables.per_language_rows(payloads, BASELINES)
  (row,) = sweep_tables.original_rows(per_language)
  assert row["mean_loss"] == pytest.approx(4.6)
  # Margins: ur 5.0 - 4.0 = 1.0, en 6.0 - 5.2 = 0.8 (the worst).
  assert row["min_unigram_margin"] == pytest.approx(0.8)
  assert row["worst_language"] == "en"
  assert row["mean_bigram_margin"] == pytest.approx((0.0 + -0.7) / 2)
  assert row["min_bigram_margin"] == pytest.approx(-0.7)


def _row(run, method, seed, value):
  return {
      "run": run,
      "forget_language": "ur",
      "method": method,
      "seed": seed,
      "retain_loss_delta": value,
      "inside_loss_delta": value,
      "outside_loss_delta": float("nan"),
      "forget_gap_closed": 1.0,
  }


def test_comparisons_pair_methods_and_configurations():
  rows = []
  for seed in range(3):
    rows += [
        _row("family4_none", "trace", seed, 0.10 + 0.01 * seed),
        _row("family4_none", "npo_retain", seed, 0.20 + 0.01 * seed),
        _row("family4_attention", "trace", seed, 0.30 + 0.02 * seed),
        _row("family1_none", "trace", seed, 0.50),
    ]
  pairs = sweep_tables.comparisons(rows, [])
  found = {(p["a"], p["b"], p["metric"]): p for p in pairs}
  method = found[
      ("family4_none:trace", "family4_none:npo_retain", "retain_loss_delta")
  ]
  assert method["kind"] == "method vs its baseline"
  assert method["diff_mean"] == pytest.approx(-0.1)
  assert method["resolved"]  # The same -0.1 on every seed.
  hybrid = found[
      ("family4_attention:trace", "family4_none:trace", "retain_loss_delta")
  ]
  assert hybrid["kind"] == "configuration"
  assert hybrid["diff_mean"] == pytest.approx(0.21)
  assert ("family4_none:trace", "family1_none:trace",
          "retain_loss_delta") in found
  # NaN metrics (no other partition) are left out, not reported as 0.
  assert not [p for p in pairs if p["metric"] == "outside_loss_delta"]


def test_audits_are_compared_with_the_never_saw_it_model():
  """Each method's relearning and audit columns against exact_retrain's,
  paired by seed (values by hand); a NaN reference gives no pair."""
  rows = []
  for seed in range(3):
    ga = _row("family1_none", "ga", seed, 0.0)
    ga.update(relearn_128_recovered=0.9 + 0.01 * seed,
              relearn_related_fa_steps=3.0, mia_auc_minkpp=0.5)
    ref = _row("family1_none", "exact_retrain", seed, 0.0)
    ref.update(relearn_128_recovered=0.6, relearn_related_fa_steps=17.0,
               mia_auc_minkpp=0.5 + 0.1 * seed)
    # A dropped partition: no weights to attack (NaN relearning), its
    # text scores as uniform (AUC 1/2).
    dropped = _row("family16_none", "exact_drop", seed, 0.0)
    dropped.update(relearn_128_recovered=float("nan"), mia_auc_minkpp=0.5)
    after = _row("family16_none", "ga", seed, 0.0)
    after.update(relearn_128_recovered=0.5, mia_auc_minkpp=0.6 + 0.02 * seed)
    rows += [ga, ref, dropped, after]
  pairs = sweep_tables.comparisons(rows, [])
  drop = [p for p in pairs if p["kind"] == "audit vs reference"
          and p["b"] == "family16_none:exact_drop"]
  assert [(p["a"], p["metric"]) for p in drop] == [
      ("family16_none:ga", "mia_auc_minkpp")]
  assert drop[0]["diff_mean"] == pytest.approx(0.12) and drop[0]["resolved"]
  audit = {p["metric"]: p for p in pairs if p["kind"] == "audit vs reference"
           and p["a"].startswith("family1_")}
  assert set(audit) == {"relearn_128_recovered", "relearn_related_fa_steps",
                        "mia_auc_minkpp"}
  assert all(p["b"] == "family1_none:exact_retrain" for p in audit.values())
  assert audit["relearn_128_recovered"]["diff_mean"] == pytest.approx(0.31)
  assert audit["relearn_128_recovered"]["resolved"]
  assert audit["relearn_related_fa_steps"]["diff_mean"] == pytest.approx(-14)
  assert audit["mia_auc_minkpp"]["diff_mean"] == pytest.approx(-0.1)
  # q-values: the whole table is one family, and each kind of question
  # its own (here 'audit vs reference' and 'configuration').
  kinds = {p["kind"] for p in pairs}
  assert len(kinds) == 2
  bh = sweep_statistics.benjamini_hochberg
  np.testing.assert_array_equal(
      [p["q_value"] for p in pairs], bh([p["p_value"] for p in pairs]))
  for kind in kinds:
    members = [p for p in pairs if p["kind"] == kind]
    np.testing.assert_array_equal(
        [p["q_value_in_kind"] for p in members],
        bh([p["p_value"] for p in members]))
  assert not audit["mia_auc_minkpp"]["resolved"]  # -0.0, -0.1, -0.2.


def test_progress_extrapolates_from_the_weight_done():
  now = [0.0]
  progress = sweep_progress.Progress(4, 10.0, clock=lambda: now[0])
  progress.skip()
  now[0] = 30.0
  line = progress.done(2.0, "family1_none seed 0 trained")
  # 2 of 10 weight in 30 s: 8 left -> 120 s.
  assert line == (
      "sweep 2/4 units (family1_none seed 0 trained) | elapsed 0:00:30 "
      "| ETA 0:02:00"
  )


def test_a_workers_progress_counts_its_own_units_and_gives_no_eta():
  """A worker sees only the jobs it claims: no ETA, no restored units."""
  now = [0.0]
  progress = sweep_progress.Progress(
      108, 10.0, clock=lambda: now[0], worker=True
  )
  progress.skip()
  progress.skip()
  now[0] = 45.0
  line = progress.done(2.0, "family4_all seed 1 trained")
  assert line == (
      "this worker: units done 1 (family4_all seed 1 trained) | elapsed "
      "0:00:45 | the sweep's line and ETA are in the parent's log"
  )


def test_sequential_comparisons_pair_each_method_with_its_baseline():
  """After each request, GradDiff - GA per seed (values by hand)."""
  rows = []
  for seed, (ga, graddiff) in enumerate([(0.5, 0.2), (0.6, 0.2), (0.7, 0.2)]):
    for removed, scale in (("ur", 1.0), ("ur+de", 2.0)):
      for method, value in (("ga", ga), ("graddiff", graddiff),
                            ("exact", 0.0)):
        rows.append({"run": "family4_none", "forget_language": removed,
                     "method": method, "seed": seed,
                     "retain_loss_delta_vs_exact": scale * value,
                     "forget_gap_closed": 1.0})
  pairs = sweep_tables.sequential_comparisons(rows)
  assert [p["forget_language"] for p in pairs] == ["ur"] * 2 + ["ur+de"] * 2
  got = {(p["forget_language"], p["metric"]): p for p in pairs}
  assert set(got) == {(k, m) for k in ("ur", "ur+de")
                      for m in sweep_tables.SEQUENTIAL_METRICS}
  later = got[("ur+de", "retain_loss_delta_vs_exact")]
  assert (later["a"], later["b"]) == ("family4_none:graddiff",
                                      "family4_none:ga")
  # Differences -0.6, -0.8, -1.0: mean -0.8, half-width 4.303 * 0.2 / 3**.5.
  assert later["diff_mean"] == pytest.approx(-0.8)
  assert later["diff_ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)
  assert later["resolved"]
  assert got[("ur", "forget_gap_closed")]["diff_mean"] == 0.0
