"""Fixtures of the binaries' tests."""

import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


@pytest.fixture
def parsed_flags():
  """absl flags parsed (defaults), and every flag a test sets restored."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  with flagsaver.flagsaver():
    yield flags.FLAGS


def smoke_sweep_command(output_dir, *args) -> list[str]:
  """scripts/tradeoff.py --preset=smoke, as a user runs it."""
  return [sys.executable, os.path.join(REPO, "scripts", "tradeoff.py"),
          "--preset=smoke", f"--output_dir={output_dir}", *args]


def smoke_sweep_env() -> dict[str, str]:
  """The test environment without XLA_FLAGS: the script sets its own."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture
def run_smoke_sweep():
  """Runs the smoke sweep to completion; the CompletedProcess."""

  def run(output_dir, *args):
    return subprocess.run(
        smoke_sweep_command(output_dir, *args), cwd=REPO,
        env=smoke_sweep_env(), capture_output=True, text=True, timeout=900)

  return run


@pytest.fixture
def start_smoke_sweep():
  """Starts the smoke sweep (stderr piped); the Popen."""

  def start(output_dir, *args):
    return subprocess.Popen(
        smoke_sweep_command(output_dir, *args), cwd=REPO,
        env=smoke_sweep_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)

  return start
