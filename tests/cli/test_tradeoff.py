"""Tests for the trade-off sweep binary (cli.tradeoff), its sweep and report.

The end-to-end test runs the smoke preset in a subprocess, as a user would,
then resumes it from a snapshot to check that a finished sweep is kept, not
redone; test_tradeoff_workers.py kills it mid-way with --workers=2 and
resumes it.
"""

import csv
import dataclasses
import json
import os

import gin
import numpy as np
import pytest

from tiered_routing.cli import configurables
from tiered_routing.cli import rewrite_report
from tiered_routing.cli import tradeoff
from tiered_routing.model import param_count
from tiered_routing.unlearning import sweep as sweep_lib
from tiered_routing.unlearning import sweep_plot
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_units

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
METHODS = [
    "exact_retrain", "mask", "ga", "graddiff", "npo", "npo_retain", "trace"
]


def _sweep(preset, bindings=()):
  gin.parse_config_files_and_bindings(
      [os.path.join(REPO, f"gin/experiments/tradeoff_{preset}.gin")],
      list(bindings),
  )
  return tradeoff.make_sweep()


def test_configurations_skip_redundant_combinations(clean_gin):
  sweep = _sweep("sample",
      [
          "tradeoff_script.sweep.num_partitions = [1, 2, 16]",
          "CONFIGURATIONS = None",
          "SEQUENTIAL_CONFIGURATIONS = []",
      ],
  )
  names = [c.name for c in sweep_lib.configurations(sweep)]
  assert names == [
      "family1_none",
      "family2_none",
      "family2_attention",
      "family2_all",
      "random2s0_none",
      "random2s0_attention",
      "random2s0_all",
      "family16_none",
      "family16_attention",
      "family16_all",
  ]
  for c in sweep_lib.configurations(sweep):
    assert c.model_config.num_partitions == c.scheme.num_partitions
    assert c.name.endswith(c.model_config.sharing)
  with pytest.raises(ValueError, match="family3_none"):
    sweep_lib.configurations(dataclasses.replace(sweep, only=("family3_none",)))


def test_sample_preset(clean_gin):
  sweep = _sweep("sample")
  names = [c.name for c in sweep_lib.configurations(sweep)]
  assert names == [
      "family1_none",
      "family4_none",
      "family4_attention",
      "family4_all",
      "random4s0_none",
      "family16_none",
  ]
  assert sweep.unlearning.forget_language == "ur"
  assert sweep.sequential_configurations == ("family4_none",)
  assert sweep.sequential_languages == ("ur", "de", "zh", "es")
  assert sweep.audit_configurations is None  # Every unit is audited.
  assert sweep.batch_size % 16 == 0  # Every n of the preset divides it.
  assert sweep.train_config.save_every_steps == sweep.train_config.train_steps


def test_cpu_preset_is_the_research_grid_at_equal_total_parameters(
    clean_gin,
):
  sweep = _sweep("cpu")
  configs = sweep_lib.configurations(sweep)
  assert [c.name for c in configs] == [
      "family1_none",
      "family2_none",
      "family4_none",
      "family4_attention",
      "family4_all",
      "random4s0_none",
      "random4s1_none",
      "family8_none",
      "family16_none",
      "family16_attention",
      "family16_all",
  ]
  totals = {
      c.name: param_count.count_params(c.model_config).total for c in configs
  }
  n1 = totals["family1_none"]
  assert all(abs(t - n1) <= 0.05 * n1 for t in totals.values()), totals
  assert len(sweep.seeds) >= 3
  assert sweep.source == "debian16" and len(sweep.languages) >= 3
  for c in configs:
    shared = c.model_config.num_partitions == 1 or c.model_config.sharing != (
        "none"
    )
    assert sweep.languages_of(c.model_config) == (
        ("ur",) if shared else ("ur", "de", "zh")
    )
  assert sweep.unlearning.eval_split == "test"
  assert sweep.unlearning.stop_split == "validation"
  assert sweep.unlearning.finetune.stop_at_reference


def test_cpu_preset_removes_four_languages_in_sequence_on_strict_configs(
    clean_gin,
):
  sweep = _sweep("cpu")
  assert sweep.sequential_languages == ("ur", "de", "zh", "es")
  units = {c.name: sweep_units.unit_names(sweep, c)
           for c in sweep_lib.configurations(sweep)}
  assert units["family4_none"] == ["ur", "de", "zh", "sequential"]
  assert units["family16_none"] == ["ur", "de", "zh", "sequential"]
  assert units["family4_attention"] == ["ur"]
  with pytest.raises(ValueError, match=r"\['family4_attention'\].*'none'"):
    sweep_lib.configurations(dataclasses.replace(
        sweep, sequential_configurations=("family4_attention",)))
  with pytest.raises(ValueError, match="sequential_languages=.*distinct"):
    dataclasses.replace(sweep, sequential_languages=("ur", "ur"))


@pytest.mark.parametrize("preset", ["smoke", "sample", "cpu", "mc4"])
def test_every_preset_takes_audit_bindings(clean_gin, preset):
  """An AuditConfig binding on the command line reaches the sweep (a
  preset that left UnlearningConfig.audits unbound ignored it silently)."""
  sweep = _sweep(preset, ["tradeoff_script.AuditConfig.enabled = False"])
  assert not sweep.unlearning.audits.enabled
  c = sweep_lib.configurations(sweep)[0]
  assert not sweep.audited(c.name, sweep.languages[0])


def test_cpu_preset_audits_where_issue_14_asks(clean_gin, tmp_path):
  """n in {1, 4, 16} and the n = 4 hybrids, the first forget language;
  a unit saved without audits is redone only where audits are asked."""
  sweep = _sweep("cpu")
  audited = {
      c.name: sorted(sweep_units.audited_units(sweep, c))
      for c in sweep_lib.configurations(sweep)
  }
  assert {n for n, codes in audited.items() if codes} == {
      "family1_none", "family4_none", "family16_none",
      "family4_attention", "family4_all",
  }
  assert all(codes in ([], ["ur"]) for codes in audited.values())
  gin.clear_config()
  everything = _sweep("cpu", ["AUDIT_CONFIGURATIONS = None",
                              "AUDIT_FORGET_LANGUAGES = None"])
  c = sweep_lib.configurations(everything)[1]  # family2_none
  assert sweep_units.audited_units(everything, c) == {"ur", "de", "zh"}
  with pytest.raises(ValueError, match=r"audit_configurations names "
                     r"\['family3_none'\]"):
    sweep_lib.configurations(dataclasses.replace(
        sweep, audit_configurations=("family3_none",)))
  job = next(j for j in sweep_units.jobs(sweep, str(tmp_path),
                                          sweep_lib.configurations(sweep))
             if j.name == "family4_none")
  ur, de = job.result_paths[:2]
  assert job.audited_paths == (ur,)
  for path in (ur, de):
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
      json.dump({"version": 2, "audited": False, "rows": []}, f)
  assert job.missing() == [ur] + list(job.result_paths[2:])


def test_mc4_preset_uses_the_size_configs(clean_gin):
  """tradeoff_mc4.gin's per-n widths are those of gin/models/n{n}.gin."""
  sweep = _sweep("mc4")
  configs = sweep_lib.configurations(sweep)
  assert len(configs) == 1 + 3 * 2 * 3 + 3  # n=1; n=2,4,8 x 2 x 3; n=16.
  for n in (1, 2, 4, 8, 16):
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [os.path.join(REPO, f"gin/models/n{n}.gin")], []
    )
    want = configurables.DecoderConfig()
    got = next(
        c.model_config for c in configs if c.model_config.num_partitions == n
    )
    assert dataclasses.replace(got, sharing="none") == want, n


def test_manifest_resumes_or_refuses(tmp_path):
  manifest = {"gin_config": "A = 1", "xla_flags": ""}
  assert not sweep_report.check_or_write_manifest(str(tmp_path), manifest)
  assert sweep_report.check_or_write_manifest(str(tmp_path), dict(manifest))
  with pytest.raises(ValueError, match="different gin_config"):
    sweep_report.check_or_write_manifest(
        str(tmp_path), {**manifest, "gin_config": "A = 2"}
    )
  # A difference `same` accepts resumes and becomes the record.
  same = lambda key, old, new: key == "gin_config" and new == "A = 3"
  changed = {**manifest, "gin_config": "A = 3"}
  assert sweep_report.check_or_write_manifest(str(tmp_path), changed, same)
  assert json.loads((tmp_path / "sweep.json").read_text()) == changed
  with pytest.raises(ValueError, match="different xla_flags"):
    sweep_report.check_or_write_manifest(
        str(tmp_path), {**changed, "xla_flags": "x"}, same)


def test_a_cpu_sweep_resumes_with_another_checkpoint_period(clean_gin):
  """The gin text the binary records: a rerun that checkpoints every 200
  steps instead of once resumes; one that trains longer is refused."""
  del clean_gin
  path = os.path.join(REPO, "gin/experiments/tradeoff_cpu.gin")
  def config(*bindings):
    gin.clear_config()
    gin.parse_config_files_and_bindings([path], list(bindings))
    return gin.config_str()
  recorded = config()
  assert tradeoff._same_results(  # pylint: disable=protected-access
      "gin_config", recorded,
      config("tiered_routing.TrainConfig.save_every_steps = 200",
             "tiered_routing.TrainConfig.log_every_steps = 10"))
  assert not tradeoff._same_results(  # pylint: disable=protected-access
      "gin_config", recorded, config("TRAIN_STEPS = 1500"))
  assert not tradeoff._same_results(  # pylint: disable=protected-access
      "xla_flags", "", "--xla_cpu_multi_thread_eigen=false")


def test_pareto_front_golden():
  forget = [0.2, 0.5, 0.5, 1.0, 3.0, np.nan, 0.9]
  loss = [0.0, 0.1, 0.05, 0.3, 0.2, 0.0, 0.4]
  # 3.0 is capped to 1 and then dominates (1.0, 0.3); NaN is never on it.
  np.testing.assert_array_equal(
      sweep_plot.pareto_front(forget, loss), [0, 2, 4]
  )


def test_markdown_table_shows_means_with_intervals():
  row = {
      "run": "family4_none",
      "forget_language": "ur",
      "method": "npo",
      "seeds": 3,
      "retain_loss_delta_mean": 0.5,
      "retain_loss_delta_ci95": 0.0625,
      "forget_gap_closed_mean": float("nan"),
      "forget_gap_closed_ci95": float("nan"),
      "flops_mean": 2e9,
      "flops_ci95": float("nan"),
  }
  lines = sweep_report.markdown_table([row]).splitlines()
  assert lines[0].startswith("| config | forget | method | seeds |")
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  columns = [k for _, k, _ in sweep_report.TABLE_COLUMNS]
  cell = dict(zip(columns, cells))
  assert cell["run"] == "family4_none" and cell["seeds"] == "3"
  assert cell["retain_loss_delta"] == "+0.500 ± 0.062"
  assert cell["forget_gap_closed"] == "n/a"
  assert cell["flops"] == "2.00e+09"  # No interval with a NaN half-width.
  assert cell["steps"] == ""  # Absent columns stay blank.


@pytest.mark.heavy
def test_smoke_sweep_end_to_end_resume_and_rerun(
    tmp_path, run_smoke_sweep, parsed_flags):
  out = tmp_path / "sweep"
  first = run_smoke_sweep(out)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(out / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["config"], r["method"]) for r in rows] == [
      (c, m) for c in ("family2_none", "family2_attention") for m in METHODS]
  for column in (
      "config",
      "forget_language",
      "method",
      "seeds",
      "forget_loss_delta_mean",
      "forget_gap_closed_ci95",
      "retain_loss_delta_mean",
      "retain_loss_delta_ci95",
      "inside_loss_delta_mean",
      "steps_mean",
      "flops_mean",
      "comp_entropy_mean",
      "comp_mi_bits_mean",
  ):
    assert column in rows[0], column
  assert {r["seeds"] for r in rows} == {"2"}
  assert all(float(r["retain_loss_delta_ci95"]) >= 0 for r in rows)
  with open(out / "results_by_seed.csv", newline="") as f:
    by_seed = list(csv.DictReader(f))
  assert len(by_seed) == 2 * 2 * len(METHODS)
  for r in by_seed:  # At most 3 steps; early stops at the reference allowed.
    if r["method"] in ("ga", "graddiff", "npo", "npo_retain", "trace"):
      assert 1 <= int(r["steps"]) <= 3, r
  table = (out / "results.md").read_text().splitlines()
  assert sum(line.startswith("| family2_attention |") for line in table) == 7
  assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(out / "per_language.csv", newline="") as f:
    per_language = list(csv.DictReader(f))
  # Per seed: the original once, the reference and every method.
  assert len(per_language) == 2 * 2 * (2 + len(METHODS)) * 16
  assert all(float(r["unigram_loss"]) > 0 for r in per_language)
  for name in ("originals.csv", "comparisons.csv", "baselines.json"):
    assert (out / name).exists(), name
  manifest = json.loads((out / "sweep.json").read_text())
  assert manifest["configurations"] == ["family2_none", "family2_attention"]
  # family2_none removes ur, then de (the same partition) in sequence.
  with open(out / "sequential.csv", newline="") as f:
    sequence = list(csv.DictReader(f))
  assert [(r["forget_language"], r["method"]) for r in sequence] == [
      (k, m) for k in ("ur", "ur+de") for m in ["exact"] + METHODS[1:]]
  assert (out / "sequential.png").read_bytes()[:4] == b"\x89PNG"
  # Each unit's cost in CPU seconds; the first also carries the original's
  # training, so that the payloads sum to the sweep's cost.
  unit = json.loads(
      (out / "runs" / "family2_attention" / "seed0" / "ur" / "result.json")
      .read_text())
  assert unit["audited"] and unit["cpu_s"] > 0 and unit["prepare_cpu_s"] > 0
  audit_cpu = sum(unit["audit_cpu_seconds"].values())
  assert 0 < audit_cpu <= unit["cpu_s"]
  assert set(unit["audit_cpu_seconds"]) == set(unit["audit_seconds"])
  assert not [p for p in os.listdir(out) if ".tmp" in p]
  # Held-out rows of every language, built once and read by every later
  # seed and resumed run (the smoke preset scores and stops on validation).
  held_out = sorted(os.listdir(out / "held_out_rows" / "length32_rowsall"))
  assert len(held_out) == 16 and all(
      p.startswith("validation.") and p.endswith(".npz") for p in held_out
  ), held_out

  before = (out / "results.csv").read_text()
  # A snapshot of the sweep's records (rewrite_report --report_dir) is a
  # sweep directory without checkpoints: resumed from it, the sweep keeps
  # every unit and writes the same results.
  snapshot = tmp_path / "snapshot"
  parsed_flags.output_dir, parsed_flags.report_dir = str(out), str(snapshot)
  rewrite_report.main([])
  assert (snapshot / "results.csv").read_text() == before
  assert (out / "runs" / "family2_none" / "seed0" / "original").is_dir()
  assert {p.name for p in (snapshot / "runs").rglob("*") if p.is_file()} == {
      "result.json"}
  second = run_smoke_sweep(snapshot)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "done earlier, kept" in second.stderr
  assert (snapshot / "results.csv").read_text() == before

  third = run_smoke_sweep(out, "--gin.FORGET_LANGUAGE='si'")
  assert third.returncode != 0
  assert "different gin_config" in third.stderr
  # A fresh run writing the same bytes is checked with two workers in
  # test_tradeoff_workers.py (a killed and resumed sweep against an
  # uninterrupted one).
