"""What a sweep cost, unit by unit, in CPU seconds (`costs.csv`).

Each unit's payload records its wall and CPU seconds (`sweep_jobs.
UnitClock`); the first unit a worker ran for a (configuration, seed) also
records training or restoring the original (`prepare_*`). CPU time is the
measure: a worker pinned to one core uses one core-second per second of
work, and CPU time leaves out what wall time counts besides the work (the
other worker's turn on a shared core, a paused machine). The sum over
`costs.csv` is the sweep's cost in core-seconds; over 2 cores, half of it
is the wall time the sweep needs at best. Payloads written before the CPU
clock existed have only `wall_s`; their CPU cells are blank and the total
says how many units it leaves out.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tiered_routing.unlearning import sweep_jobs

NAN = float("nan")


def _unit_name(payload: Mapping[str, Any]) -> tuple[str, str]:
  """(configuration, unit): a forget language or the sequence."""
  if payload.get("sequential"):
    return payload["sequential"][0]["run"], sweep_jobs.SEQUENTIAL
  first = payload["rows"][0]
  return first["run"], first["forget_language"]


def _audited(payload: Mapping[str, Any]) -> bool:
  """Whether a unit ran the audits (payloads from before the `audited`
  key: whether its rows have their columns)."""
  if "audited" in payload:
    return bool(payload["audited"])
  rows = payload.get("rows") or [{}]
  return any(k.startswith("mia_auc") for k in rows[0])


def cost_rows(payloads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per unit: its CPU seconds split into the original's
  preparation, the audits and the rest (retraining, methods, scoring)."""
  out = []
  for p in payloads:
    if not p.get("rows") and not p.get("sequential"):
      continue
    config, unit = _unit_name(p)
    cpu = p.get("cpu_s", NAN)
    audits = sum(p.get("audit_cpu_seconds", {}).values())
    out.append({
        "run": config,
        "seed": p["seed"],
        "unit": unit,
        "audited": _audited(p),
        "prepare_cpu_s": p.get("prepare_cpu_s", 0.0 if "cpu_s" in p else NAN),
        "unit_cpu_s": cpu,
        "audit_cpu_s": audits if "cpu_s" in p else NAN,
        "wall_s": p.get("wall_s", NAN),
    })
  return out


def total_line(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line: the measured units' core-hours, split as in `cost_rows`."""
  timed = [r for r in rows if not math.isnan(r["unit_cpu_s"])]
  prepare = sum(r["prepare_cpu_s"] for r in timed)
  units = sum(r["unit_cpu_s"] for r in timed)
  audits = sum(r["audit_cpu_s"] for r in timed)
  hours = lambda s: f"{s / 3600:.2f}"
  return (
      f"{len(timed)} of {len(rows)} units timed: "
      f"{hours(prepare + units)} core-hours (originals {hours(prepare)}, "
      f"forgetting {hours(units - audits)}, audits {hours(audits)})"
  )
