r"""Rewrites a sweep's report files from its finished units' result.json.

  python -m tiered_routing.cli.rewrite_report --output_dir=/tmp/cpu_run \
      [--report_dir=docs/results/cpu]

The trade-off sweep (`cli.tradeoff`) rewrites its report after every unit
with the code it started with. After the report code changes (a new table,
a new comparison), this writes the report of the units finished so far with
the current code, without stopping the sweep or rerunning a unit: every
current `runs/<config>/seed<s>/<unit>/result.json` (`sweep_jobs.is_current`)
in the order of the sweep's configurations (`sweep.json`), then seeds, then
units (the sequential removals last), with the sweep's n-gram baselines
(`baselines.json`). --report_dir (default: --output_dir) receives the files
of `unlearning.sweep_report`; a snapshot for the docs goes there.

A --report_dir other than --output_dir also receives the sweep's records:
`sweep.json`, `baselines.json` and every current unit's `result.json` at
its own path. The snapshot is then a sweep directory without checkpoints:
`--output_dir=<snapshot>` rebuilds its report, and the same sweep command
pointed at a copy of it resumes the grid on another machine, running only
the missing units (a (configuration, seed) with some units done retrains
its original first). A snapshot's unit missing from --output_dir stops the
run before anything is written: it would drop out of the new report.
"""

import glob
import json
import os
import re
import shutil
from typing import Sequence

from absl import flags
from absl import logging

from tiered_routing.cli import gin_flags
from tiered_routing.cli import user_errors
from tiered_routing.train import atomic_file
from tiered_routing.unlearning import sweep_costs
from tiered_routing.unlearning import sweep_jobs
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_units

FLAGS = flags.FLAGS
_REPORT_DIR = flags.DEFINE_string(
    "report_dir", None,
    "Where the report files go (default: --output_dir).")


def _unit_order(path: str) -> tuple:
  seed_dir, unit = os.path.split(os.path.dirname(path))
  seed = int(re.sub(r"\D", "", os.path.basename(seed_dir)) or 0)
  return seed, unit == sweep_units.SEQUENTIAL, unit


def finished_paths(output_dir: str, configurations: Sequence[str]):
  """Every current unit's result.json, in the sweep's order."""
  finished = []
  for name in configurations:
    paths = glob.glob(os.path.join(
        output_dir, "runs", name, "seed*", "*", "result.json"))
    finished += [p for p in sorted(paths, key=_unit_order)
                 if sweep_jobs.is_current(p)]
  return finished


def _relative(paths: Sequence[str], root: str) -> set[str]:
  return {os.path.relpath(p, root) for p in paths}


def copy_records(
    output_dir: str, report_dir: str, units: Sequence[str],
    configurations: Sequence[str],
) -> None:
  """Copies the sweep's records, `units` (`finished_paths`) among them,
  into `report_dir` (module docstring). Each file is replaced whole
  (`atomic_file`)."""
  lost = sorted(_relative(finished_paths(report_dir, configurations),
                          report_dir) - _relative(units, output_dir))
  if lost:
    raise ValueError(
        f"{report_dir} holds {len(lost)} finished unit(s) that {output_dir} "
        f"lacks ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}): "
        "the new report would drop them. Copy them into --output_dir first "
        f"(cp -rn {os.path.join(report_dir, 'runs')} {output_dir}/).")
  for path in [os.path.join(output_dir, "sweep.json"),
               os.path.join(output_dir, "baselines.json"), *units]:
    target = os.path.join(report_dir, os.path.relpath(path, output_dir))
    with open(path, "rb") as source, atomic_file.replacing(
        target, "wb") as copy:
      shutil.copyfileobj(source, copy)


def _title(manifest: dict, payloads) -> str:
  """The sweep's title (`sweep._title`) from its manifest and units."""
  source = re.search(r"sweep\.source = '(\w+)'",
                     manifest.get("gin_config", ""))
  codes = dict.fromkeys(
      r["forget_language"] for p in payloads for r in p["rows"])
  seeds = len({p["seed"] for p in payloads})
  return sweep_report.title(
      codes, source.group(1) if source else "unknown", seeds)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise ValueError(
        f"{path} does not exist: --output_dir must be a sweep's output "
        "directory (it holds sweep.json and baselines.json).")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main(argv: Sequence[str]) -> None:
  del argv
  output_dir = gin_flags.OUTPUT_DIR.value
  if not output_dir:
    raise ValueError("--output_dir is required: a sweep's output directory.")
  manifest = _read_json(os.path.join(output_dir, "sweep.json"))
  baselines = _read_json(os.path.join(output_dir, "baselines.json"))
  configurations = manifest["configurations"]
  units = finished_paths(output_dir, configurations)
  if not units:
    raise ValueError(f"{output_dir} has no finished unit of this version.")
  payloads = [sweep_jobs.load_result(p) for p in units]
  report_dir = _REPORT_DIR.value or output_dir
  os.makedirs(report_dir, exist_ok=True)
  if not os.path.samefile(report_dir, output_dir):
    copy_records(output_dir, report_dir, units, configurations)
    logging.info("%d units' records copied to %s.", len(units), report_dir)
  sweep_report.write_outputs(
      report_dir, payloads, _title(manifest, payloads), baselines)
  logging.info("%d units' report written to %s. Cost: %s.", len(payloads),
               report_dir,
               sweep_costs.total_line(sweep_costs.cost_rows(payloads)))


if __name__ == "__main__":
  user_errors.run(main)
