"""Tests for unlearning.sweep_costs: a sweep's cost per unit, in CPU time."""

import math

from tiered_routing.unlearning import sweep_costs


def _payloads():
  row = lambda lang: {"run": "family4_none", "forget_language": lang}
  return [
      {"seed": 0, "rows": [row("ur")], "wall_s": 900.0, "cpu_s": 720.0,
       "prepare_wall_s": 400.0, "prepare_cpu_s": 360.0, "audited": True,
       "audit_seconds": {"relearning": 300.0, "membership": 100.0},
       "audit_cpu_seconds": {"relearning": 250.0, "membership": 110.0}},
      {"seed": 0, "rows": [row("de")], "wall_s": 200.0, "cpu_s": 180.0,
       "audited": False, "audit_seconds": {}, "audit_cpu_seconds": {}},
      {"seed": 0, "rows": [], "languages": {}, "wall_s": 50.0,
       "cpu_s": 36.0,
       "sequential": [{"run": "family4_none", "method": "exact"}]},
      # Written before the CPU clock: wall time only.
      {"seed": 1, "rows": [{**row("ur"), "mia_auc_loss": 0.5}],
       "wall_s": 1000.0},
  ]


def test_cost_rows_split_each_unit():
  rows = sweep_costs.cost_rows(_payloads())
  assert [(r["seed"], r["unit"], r["audited"]) for r in rows] == [
      (0, "ur", True), (0, "de", False), (0, "sequential", False),
      (1, "ur", True)]
  assert rows[0]["prepare_cpu_s"] == 360.0
  assert rows[0]["unit_cpu_s"] == 720.0
  assert rows[0]["audit_cpu_s"] == 360.0  # CPU, not the wall seconds.
  assert rows[1]["prepare_cpu_s"] == 0.0 and rows[1]["audit_cpu_s"] == 0.0
  assert all(math.isnan(rows[3][k])
             for k in ("prepare_cpu_s", "unit_cpu_s", "audit_cpu_s"))
  assert rows[3]["wall_s"] == 1000.0


def test_total_line_sums_the_timed_units_by_hand():
  line = sweep_costs.total_line(sweep_costs.cost_rows(_payloads()))
  # Originals 360 s; units 720 + 180 + 36 = 936 s of which audits 360 s.
  assert line == ("3 of 4 units timed: 0.36 core-hours (originals 0.10, "
                  "forgetting 0.16, audits 0.10)")
