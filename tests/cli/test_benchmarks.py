"""End-to-end runs of the benchmark scripts at their smallest sizes.

Each script runs in its own process (compile_check must set the simulated
device count before jax starts; the others would clash over absl flags), all
three at once to use both cores. The checks are about structure and sanity:
every table has its columns, one row per case, and finite positive ratios.
No timing is asserted.
"""

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"

RUNS = {
    "bench_moe": [
        "--preset=smoke",
        "--experts=4",
        "--tokens=64,128",
        "--repeats=1",
    ],
    "bench_train": ["--preset=smoke", "--noinput_pipeline"],
    "compile_check": [
        "--models=tiny",
        "--devices=2",
        "--length=16",
        "--rows_per_data_shard=1",
        "--num_layers=1",
    ],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  """Runs every script once; returns {name: (stdout, csv rows)}."""
  out_dir = tmp_path_factory.mktemp("bench")
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  procs = {}
  for name, args in RUNS.items():
    cmd = [
        sys.executable,
        str(SCRIPTS / f"{name}.py"),
        *args,
        f"--output_dir={out_dir / name}",
    ]
    procs[name] = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
  results = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{stderr[-3000:]}"
    with open(out_dir / name / f"{name}.csv") as f:
      rows = list(csv.DictReader(f))
    md = (out_dir / name / f"{name}.md").read_text()
    results[name] = (stdout, rows, md)
  return results


def _positive(value: str) -> bool:
  return math.isfinite(float(value)) and float(value) > 0


def test_bench_moe_table(outputs):
  stdout, rows, md = outputs["bench_moe"]
  # One row per (impl, T) at E=4, k=2.
  assert sorted((r["impl"], r["tokens"]) for r in rows) == sorted(
      (impl, t)
      for impl in ("sort_gather", "einsum", "ragged")
      for t in ("64", "128")
  )
  for row in rows:
    assert row["experts"] == "4" and row["top_k"] == "2"
    for column in (
        "ms",
        "dense_ms",
        "moe_over_dense",
        "mfu_vs_matmul",
        "dense_mfu_vs_matmul",
        "matmul_gflops",
    ):
      assert _positive(row[column]), (column, row)
  assert md.count("\n| sort_gather |") == 2
  assert "dispatch='auto' resolves to 'sort_gather'" in stdout
  assert "time ~ T^p, sort_gather E=4 k=2" in stdout


def test_bench_train_table(outputs):
  stdout, rows, _ = outputs["bench_train"]
  assert len(rows) == 1
  row = rows[0]
  assert (row["family"], row["sharing"], row["partitions"]) == (
      "tiny",
      "none",
      "2",
  )
  # The n = 2 member halves the experts per partition and keeps the n = 1
  # total within a few percent.
  assert int(row["experts_per_part"]) == 16
  assert abs(float(row["total_vs_n1"].rstrip("%"))) <= 5
  for column in ("step_ms", "tokens_per_s", "total_params_M", "compile_s"):
    assert _positive(row[column]), (column, row)
  assert row["input_ms"] == ""  # --noinput_pipeline
  assert "tokens_per_s" in stdout


def test_compile_check_table(outputs):
  _, rows, _ = outputs["compile_check"]
  assert len(rows) == 1
  row = rows[0]
  assert row["devices"] == "2" and row["mesh"].startswith("2x1x1x1")
  for column in ("params_gib", "opt_state_gib", "temp_gib", "peak_gib"):
    assert _positive(row[column]), (column, row)
  # AdamW keeps two moments per parameter, all float32 like the params.
  assert float(row["opt_state_gib"]) == pytest.approx(
      2 * float(row["params_gib"]), rel=0.01
  )
  assert float(row["peak_gib"]) >= float(row["params_gib"]) + float(
      row["opt_state_gib"]
  )
  assert set(row["fits"].split(",")) == {"v5e", "v4", "v5p"}
