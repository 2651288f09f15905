"""scripts/launch_tpu.sh's dry run prints commands that work as printed."""

import base64
import os
import re
import shlex
import subprocess

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SCRIPT = os.path.join(REPO_ROOT, "scripts", "launch_tpu.sh")


def _run(*args):
  proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True,
                        text=True, check=True)
  return proc.stdout


def test_help_is_the_header_only():
  out = _run("--help")
  assert out.startswith("Creates a Cloud TPU VM")
  assert "set -euo pipefail" not in out
  assert "--model_dir=" in out


def test_dry_run_commands_are_self_contained():
  """No command refers to a local temporary file (the dry run printed an
  scp of one it had deleted); the hints keep --project; the hosts run
  Python 3.11 from a virtualenv (the runtime's python3 is 3.10)."""
  out = _run("--project=my-proj", "--model_dir=gs://b/run o'k", "--",
             "--gin.TRAIN_STEPS=5", "--gin.NAME='a b'")
  lines = out.splitlines()
  assert not [l for l in lines if "/tmp" in l and not l.startswith("#")]
  follow = next(l for l in lines if l.startswith("# Follow:"))
  delete = next(l for l in lines if l.startswith("# Delete:"))
  assert "--project=my-proj" in follow and "--project=my-proj" in delete
  install = next(l for l in lines if "uv venv" in l)
  assert "--python 3.11 ~/tr-venv" in install
  train = next(l for l in lines if "base64 -d > run_train.sh" in l)
  encoded = re.search(r"echo (\S+) \| base64 -d", train).group(1)
  script = base64.b64decode(encoded).decode().splitlines()
  exec_line = next(l for l in script if l.startswith("exec "))
  assert shlex.split(exec_line) == [
      "exec", "~/tr-venv/bin/python", "-m", "tiered_routing.train",
      "--multi_host", "--gin_file=gin/experiments/mc4_n4_family_none.gin",
      "--gin.MODEL_DIR='gs://b/run o'k'", "--gin.TRAIN_STEPS=5",
      "--gin.NAME='a b'",
  ]
  # The printed copy of the script is the one the hosts get.
  printed = [l[len("#   "):] for l in lines if l.startswith("#   ")]
  assert printed == script
