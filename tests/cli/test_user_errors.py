"""User errors end a binary with one line and status 1; bugs keep tracebacks."""

import errno
import importlib
import os
import subprocess
import sys

from absl import flags
import pytest

from tiered_routing.cli import user_errors
from tiered_routing.train import checkpoint_integrity
from tiered_routing.train import model_dir_lock

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


pytestmark = pytest.mark.usefixtures("parsed_flags")


def _raising(error):
  def main(argv):
    del argv
    raise error
  return main


@pytest.mark.parametrize("error", [
    ValueError("TrainConfig.train_steps=-3 must be an int >= 1."),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.gin"),
    OSError(errno.ENOSPC, "No space left on device", "/full/ckpt"),
    OSError(errno.EROFS, "Read-only file system", "/ro/eval"),
    checkpoint_integrity.CheckpointDamagedError("Checkpoint step 60 ..."),
    model_dir_lock.ModelDirInUseError("MODEL_DIR /m is in use by 1@h"),
    FloatingPointError("Non-finite values at training step 7"),
])
def test_user_errors_print_one_line_and_exit_1(error, capsys):
  with pytest.raises(SystemExit) as info:
    user_errors.guarded(_raising(error), sys.exit)(["prog"])
  assert info.value.code == user_errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  first = err.splitlines()[0]
  assert first.startswith("error: ")
  expected = (f"{error.strerror}: {error.filename}"
              if isinstance(error, OSError) and error.filename
              else str(error))
  assert first == f"error: {expected}"
  assert "Traceback" not in err


@pytest.mark.parametrize("error", [
    TypeError("unsupported operand"), KeyError("x"),
    OSError(errno.EIO, "Input/output error"),
])
def test_bugs_keep_their_traceback(error):
  with pytest.raises(type(error)):
    user_errors.guarded(_raising(error), sys.exit)(["prog"])


def test_show_traceback_reraises_user_errors():
  flags.FLAGS.show_traceback = True
  with pytest.raises(ValueError, match="bad"):
    user_errors.guarded(_raising(ValueError("bad")), sys.exit)(["prog"])


def test_ctrl_c_exits_130(capsys):
  with pytest.raises(SystemExit) as info:
    user_errors.guarded(_raising(KeyboardInterrupt()), sys.exit)(["prog"])
  assert info.value.code == 130
  assert "Interrupted" in capsys.readouterr().err


def test_train_binary_bad_value_is_one_line(tmp_path):
  command = [
      sys.executable, "-m", "tiered_routing.train",
      "--gin_file=gin/quickstart.gin", "--gin.TRAIN_STEPS=-3",
      f"--gin.MODEL_DIR='{tmp_path}'",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert ("error: TrainConfig.train_steps=-3 must be an int >= 1."
          in proc.stderr)
  verbose = subprocess.run(command + ["--show_traceback"], cwd=REPO_ROOT,
                           env=env, capture_output=True, text=True,
                           timeout=300)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_help_lists_the_binary_flags():
  proc = subprocess.run(
      [sys.executable, "-m", "tiered_routing.train", "--help"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  # (absl ends --help with status 1.)
  for flag in ("--gin_file", "--gin_bindings", "--[no]show_traceback",
               "--[no]allow_changed_config"):
    assert flag in proc.stdout, proc.stdout
  assert "Trains a TieredDecoder from gin files" in proc.stdout


def test_every_binary_imports_beside_every_other():
  """absl flags live in one process-wide registry: two binaries that
  define one flag name cannot both be imported (a test file of each on
  one pytest worker, or a tool that drives both, fails with
  DuplicateFlagError)."""
  package = os.path.join(REPO_ROOT, "tiered_routing", "cli")
  names = sorted(n[:-3] for n in os.listdir(package)
                 if n.endswith(".py") and n != "__init__.py")
  assert {"compare_reports", "false_discoveries", "tradeoff"} <= set(names)
  for name in names:
    importlib.import_module(f"tiered_routing.cli.{name}")
