"""End-to-end tests of the train and eval binaries.

The resume test runs `python -m tiered_routing.train` in a subprocess (on 2
simulated devices, one per partition), kills it with SIGKILL after its first
checkpoint, runs the same command again, and compares the final train state
with that of an uninterrupted run bitwise. The eval binary then restores the
checkpoint onto this process's 8-device mesh.
"""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from absl import app
import gin
import jax
import numpy as np
import pytest

from tiered_routing.cli import eval as eval_lib
from tiered_routing.cli import gin_flags
from tiered_routing.cli import train as train_lib
from tiered_routing.tier1 import languages
from tiered_routing.train import checkpoints
from tiered_routing.train import metrics_writer

# Module fixtures run the train binary several times (pytest.ini).
pytestmark = pytest.mark.heavy

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TRAIN_STEPS = 32
SAVE_EVERY = 4
GIN_FILES = ["gin/models/tiny.gin", "gin/runs/pretrain.gin"]
BINDINGS = [
    "NUM_PARTITIONS = 2",
    "VOCAB_SIZE = 4096",
    f"TRAIN_STEPS = {TRAIN_STEPS}",
    "BATCH_SIZE = 8",
    "TASK_FEATURE_LENGTHS = {'targets': 32}",
    f"SAVE_EVERY_STEPS = {SAVE_EVERY}",
    f"LOG_EVERY_STEPS = {SAVE_EVERY}",
    "WARMUP_STEPS = 2",
    "LEARNING_RATE = 0.01",
    # One MoE layer and the einsum dispatch: XLA compile time dominates.
    "DISPATCH = 'einsum'",
    "tiered_routing.DecoderConfig.num_layers = 1",
    "tiered_routing.DecoderConfig.moe_every = 1",
    # Partitions on their own devices, the rest data-parallel.
    "tiered_routing.MeshConfig.partition = 2",
]


def _bindings(model_dir):
  return BINDINGS + [f"MODEL_DIR = '{model_dir}'"]


def _command(model_dir):
  """The train binary, using the --gin.NAME=VALUE shorthand for MODEL_DIR."""
  return (
      [sys.executable, "-m", "tiered_routing.train"]
      + [f"--gin_file={f}" for f in GIN_FILES]
      + [f"--gin_bindings={b}" for b in BINDINGS]
      + [f"--gin.MODEL_DIR='{model_dir}'"]
  )


def _parse(model_dir, extra_files=(), extra_bindings=()):
  gin.clear_config()
  gin_flags.parse_gin(
      GIN_FILES + list(extra_files),
      _bindings(model_dir) + list(extra_bindings),
      [REPO_ROOT],
      train_lib.REQUIRED_MACROS,
  )


def _wait_for(proc, path, timeout=600):
  """Polls until `path` exists (a lock file, a complete checkpoint)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      return
    if proc.poll() is not None:
      raise AssertionError(
          f"train exited with {proc.returncode} before {path} appeared."
      )
    time.sleep(0.02)
  raise AssertionError(f"{path} did not appear within {timeout}s.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(uninterrupted dir, resumed dir, checkpoint step at the kill, output).

  The three runs share a persistent XLA compilation cache, so only the first
  compiles; a cached executable is the same code, so the comparison is as
  strict as with fresh compiles.
  """
  root = tmp_path_factory.mktemp("runs")
  env = dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  uninterrupted, resumed = str(root / "uninterrupted"), str(root / "resumed")
  first = subprocess.run(
      _command(uninterrupted),
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  assert first.returncode == 0, first.stdout + first.stderr
  _parse(resumed)  # Ready for the second-job check below.
  proc = subprocess.Popen(
      _command(resumed),
      cwd=REPO_ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  ckpt_dir = os.path.join(resumed, "checkpoints")
  try:
    _wait_for(proc, os.path.join(resumed, "LOCK"))
    # While the job runs, a second job on its MODEL_DIR must refuse.
    with pytest.raises(RuntimeError, match=f"is in use by {proc.pid}@"):
      train_lib.run()
    _wait_for(proc, os.path.join(ckpt_dir, str(SAVE_EVERY)))
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
  finally:
    gin.clear_config()
    proc.kill()
    proc.wait()
  killed_at = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert killed_at < TRAIN_STEPS
  rerun = subprocess.run(
      _command(resumed),
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  return uninterrupted, resumed, killed_at, rerun.stdout + rerun.stderr


def _restore(model_dir, key):
  with checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints")) as c:
    assert c.latest_step() == TRAIN_STEPS
    return c.restore_params(key=key)


def test_resume_after_sigkill_is_bitwise_identical(runs):
  uninterrupted, resumed, killed_at, output = runs
  assert f"Resuming from step {killed_at}" in output
  for key in ("step", "params", "opt_state"):
    a = jax.tree.leaves(_restore(uninterrupted, key))
    b = jax.tree.leaves(_restore(resumed, key))
    assert a and len(a) == len(b)
    for x, y in zip(a, b):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(x, y)


def test_operative_config_and_metrics(runs):
  model_dir = runs[1]
  with open(os.path.join(model_dir, "config.gin")) as f:
    config = f.read()
  assert f"MODEL_DIR = '{model_dir}'" in config
  assert f"TRAIN_STEPS = {TRAIN_STEPS}" in config
  assert "num_experts = 4" in config
  assert not [n for n in os.listdir(model_dir) if ".tmp" in n]
  records = metrics_writer.read_jsonl(
      os.path.join(model_dir, "train", metrics_writer.JSONL_NAME)
  )
  assert sorted(records) == list(range(SAVE_EVERY, TRAIN_STEPS + 1, SAVE_EVERY))
  assert records[TRAIN_STEPS]["loss"] < records[SAVE_EVERY]["loss"]


def test_eval_binary_reports_every_language(runs, clean_gin, capsys):
  model_dir = runs[1]
  _parse(model_dir, ["gin/runs/eval.gin"])
  # What a training run that is saving right now has on disk: evaluating
  # must not delete it (the trainer's own Checkpointer would, on start).
  in_progress = os.path.join(
      model_dir, "checkpoints", "999.orbax-checkpoint-tmp-123"
  )
  os.makedirs(in_progress)
  results = eval_lib.run()
  assert os.path.isdir(in_progress)
  os.rmdir(in_progress)
  for code in languages.CODES:
    assert results[f"{code}/num_tokens"] > 0, code
    assert math.isfinite(results[f"{code}/bits_per_byte"]), code
    assert results[f"{code}/perplexity"] == pytest.approx(
        math.exp(results[f"{code}/loss"])
    )
  total_tokens = sum(results[f"{c}/num_tokens"] for c in languages.CODES)
  assert results["all/num_tokens"] == total_tokens
  plain = [p for p in _eval_records(model_dir)
           if not _eval_record(p).get("routing_config")]
  assert len(plain) == 1, plain
  # The printed table: a row per language, then 'all' and 'macro'.
  rows = [line.split() for line in capsys.readouterr().out.splitlines()]
  table = [r[0] for r in rows if r and r[0] in (*languages.CODES, "all",
                                                 "macro")]
  assert table == [*languages.CODES, "all", "macro"]


def _eval_records(model_dir):
  return sorted(glob.glob(os.path.join(
      model_dir, "eval", "validation-*", f"validation_step_{TRAIN_STEPS}.json"
  )))


def _eval_record(path):
  with open(path) as f:
    return json.load(f)


def test_eval_name_with_another_config_and_unwritable_dirs_are_refused(
    runs, clean_gin, tmp_path
):
  model_dir = runs[1]
  # Two documented evaluations in a row get directories of their own.
  _parse(model_dir, ["gin/runs/eval.gin"])
  plain = eval_lib.eval_dir(model_dir, "validation", None)
  _parse(model_dir, ["gin/runs/eval_routing.gin"])
  routed = eval_lib.eval_dir(model_dir, "validation", None)
  assert os.path.dirname(plain) == os.path.dirname(routed)
  assert os.path.basename(plain).startswith("validation-")
  assert plain != routed
  _parse(model_dir, ["gin/runs/eval.gin"], ["EVAL_NAME = 'mine'"])
  out = eval_lib.eval_dir(model_dir, "validation", "mine")
  assert out == os.path.join(model_dir, "eval", "mine")
  _parse(model_dir, ["gin/runs/eval.gin"],
         ["EVAL_NAME = 'mine'", "EVAL_SPLIT = 'train'"])
  with pytest.raises(ValueError, match="EVAL_NAME='mine' already holds"):
    eval_lib.eval_dir(model_dir, "train", "mine")
  with pytest.raises(ValueError, match="EVAL_NAME='../x': allowed"):
    eval_lib.eval_dir(model_dir, "train", "../x")
  # A directory that cannot be written fails before the evaluation runs
  # (tests run as root, for whom permissions do not stop writes).
  (tmp_path / "eval").write_text("not a directory")
  with pytest.raises(PermissionError, match="Cannot write the evaluation"):
    eval_lib.eval_dir(str(tmp_path), "validation", None)


# One language per partition of family2 (si: p0, en: p1) keeps the SeqIO and
# routed passes short; capacity_factor = num_experts / top_k drops no token,
# so unpacked rows (SeqIO, routing) score exactly like packed ones.
ROUTED_EVAL_BINDINGS = [
    "MIXTURE_OR_TASK_NAME = ['tr.sample.si_v1', 'tr.sample.en_v1']",
    "BATCH_SIZE = 32",
    "ENSEMBLE_TOP_K = 1",
    "tiered_routing.DecoderConfig.capacity_factor = 2.0",
]


@pytest.fixture(scope="module")
def routed_eval_results(runs):
  """The eval binary with gin/runs/eval_routing.gin: all three paths."""
  model_dir = runs[1]
  gin.clear_config()
  try:
    gin_flags.parse_gin(
        GIN_FILES + ["gin/runs/eval_routing.gin"],
        _bindings(model_dir) + ROUTED_EVAL_BINDINGS,
        [REPO_ROOT],
        eval_lib.REQUIRED_MACROS,
    )
    return eval_lib.run()
  finally:
    gin.clear_config()


def test_seqio_evaluator_equals_fast_path(routed_eval_results):
  r = routed_eval_results
  for code in ("si", "en"):
    for metric in ("loss", "bits_per_byte", "num_tokens", "num_bytes"):
      fast = r[f"{code}/{metric}"]
      assert r[f"seqio/{code}/{metric}"] == pytest.approx(fast, rel=1e-5)
      oracle = r[f"routing/oracle/{code}/{metric}"]
      assert oracle == pytest.approx(fast, rel=1e-5)
    assert r[f"seqio/{code}/perplexity"] == pytest.approx(
        math.exp(r[f"{code}/loss"]), rel=1e-5
    )
  assert not [k for k in r if k.startswith("seqio/") and "/hi/" in k]


def test_routed_eval_reports_every_mode_and_its_cost(runs, routed_eval_results):
  r = routed_eval_results
  ens = "routing/ensemble_posterior_top1"
  for code in ("si", "en", "all", "macro"):
    # A one-partition ensemble is the classifier's partition alone.
    for metric in ("loss", "bits_per_byte"):
      assert r[f"{ens}/{code}/{metric}"] == pytest.approx(
          r[f"routing/classifier/{code}/{metric}"], rel=1e-6
      )
      cost = r[f"routing/classifier/{code}/{metric}_cost"]
      assert cost == pytest.approx(
          r[f"routing/classifier/{code}/{metric}"]
          - r[f"routing/oracle/{code}/{metric}"]
      )
  for code in ("si", "en"):
    assert r[f"routing/classifier/{code}/routing_accuracy"] == 1.0
  records = [_eval_record(p) for p in _eval_records(runs[1])]
  (record,) = [r for r in records if r.get("routing_config")]
  assert record["routing_config"]["top_k"] == 1
  assert record[f"{ens}/all/loss"] == r[f"{ens}/all/loss"]


def test_eval_routing_gin_rejects_bad_mode(clean_gin):
  gin.clear_config()
  gin_flags.parse_gin(
      GIN_FILES + ["gin/runs/eval_routing.gin"],
      _bindings("/tmp/unused") + ["INFERENCE_ROUTING = ['oracle', 'oracel']"],
      [REPO_ROOT],
      eval_lib.REQUIRED_MACROS,
  )
  with pytest.raises(ValueError, match=r"'oracel'; allowed: \('oracle'"):
    eval_lib.run()


def test_missing_macro_names_it(clean_gin):
  gin.clear_config()
  bindings = [b for b in BINDINGS if not b.startswith("TRAIN_STEPS")]
  with pytest.raises(
      ValueError, match=r"macro TRAIN_STEPS is required.*" r"--gin.TRAIN_STEPS="
  ):
    gin_flags.parse_gin(
        GIN_FILES,
        bindings + ["MODEL_DIR = '/tmp/x'"],
        [REPO_ROOT],
        train_lib.REQUIRED_MACROS,
    )
  gin.clear_config()
  with pytest.raises(ValueError, match="macro MODEL_DIR is required"):
    gin_flags.parse_gin(
        ["gin/models/tiny.gin"], [], [REPO_ROOT], train_lib.REQUIRED_MACROS
    )


def test_rewrite_gin_args():
  argv = [
      "train",
      "--gin.MODEL_DIR='/tmp/a'",
      "--gin_file=x.gin",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 8}",
  ]
  assert gin_flags.rewrite_gin_args(argv) == [
      "train",
      "--gin_bindings=MODEL_DIR = '/tmp/a'",
      "--gin_file=x.gin",
      "--gin_bindings=TASK_FEATURE_LENGTHS = {'targets': 8}",
  ]
  with pytest.raises(Exception, match="--gin.NAME=VALUE"):
    gin_flags.rewrite_gin_args(["--gin.MODEL_DIR"])


def test_mixture_names_must_match_partitions():
  assert gin_flags.mixture_names("a", 1) == ["a"]
  with pytest.raises(ValueError, match="list of num_partitions=2 names"):
    gin_flags.mixture_names("a", 2)
  with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
    gin_flags.task_feature_length({"inputs": 4, "targets": 4})


def test_positional_arguments_are_rejected():
  with pytest.raises(app.UsageError, match=r"Unexpected arguments: \['x'\]"):
    gin_flags.parse_command_line(["train", "x"])


def test_resume_with_another_seed_or_width_is_refused(runs, clean_gin):
  """Resuming with another SEED (silently accepted before) or expert width
  (an Orbax traceback before) names the changed settings, before any
  training and without touching the run's config.gin."""
  model_dir = runs[1]
  config_path = os.path.join(model_dir, "config.gin")
  with open(config_path) as f:
    before = f.read()
  gin.clear_config()
  gin_flags.parse_gin(
      GIN_FILES,
      _bindings(model_dir) + [
          "SEED = 7", "tiered_routing.DecoderConfig.expert_d_ff = 16",
          f"TRAIN_STEPS = {TRAIN_STEPS + 8}",  # Extending is allowed.
      ],
      [REPO_ROOT],
      train_lib.REQUIRED_MACROS,
  )
  with pytest.raises(ValueError) as info:
    train_lib.run()
  message = str(info.value)
  assert f"MODEL_DIR {model_dir} holds a run trained with other" in message
  assert "SEED: 0 -> 7" in message
  assert "DecoderConfig.expert_d_ff: 64 -> 16" in message
  assert "TRAIN_STEPS" not in message
  assert "--allow_changed_config" in message
  with open(config_path) as f:
    assert f.read() == before
  with checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints")) as c:
    assert c.latest_step() == TRAIN_STEPS


def test_interrupt_saves_the_step_and_resumes_bitwise(runs, tmp_path):
  """SIGTERM mid-run: the job finishes its step, saves it, exits 130 with
  one line saying where; the same command resumes there and ends bitwise
  where the uninterrupted run did. (Ctrl-C takes the same path: both
  signals set the same flag, tests/train/test_interrupts.py.)"""
  signum = signal.SIGTERM
  uninterrupted = runs[0]
  model_dir = str(tmp_path / "interrupted")
  env = dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=os.path.join(
          os.path.dirname(uninterrupted), "xla_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  proc = subprocess.Popen(_command(model_dir), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  try:
    _wait_for(proc, os.path.join(model_dir, "checkpoints", str(SAVE_EVERY)))
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr[-3000:]
  name = signal.Signals(signum).name
  match = re.search(rf"Interrupted: {name} at step (\d+): saved checkpoint "
                    r"(\d+) in", stderr)
  assert match, stderr[-3000:]
  assert "Traceback" not in stderr
  step = int(match.group(1))
  assert SAVE_EVERY <= step < TRAIN_STEPS and int(match.group(2)) == step
  steps = checkpoints.complete_steps(os.path.join(model_dir, "checkpoints"))
  assert steps[-1] == step
  rerun = subprocess.run(_command(model_dir), cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resuming from step {step}" in rerun.stderr
  for key in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(_restore(uninterrupted, key)),
                    jax.tree.leaves(_restore(model_dir, key))):
      np.testing.assert_array_equal(x, y)
