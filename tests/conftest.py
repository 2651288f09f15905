"""Test-wide setup: 8 simulated CPU devices, fast CPU compiles, quiet TF.

XLA reads its flags once, when the backend starts, so they are set here before
any test module imports jax. The tests compile many small programs and run
each for a few steps, so XLA's expensive CPU optimisation passes cost far more
than they save; turning them off changes no result a test checks (runs that
are compared with each other are compiled the same way).
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib

import gin
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_gin():
  """An empty gin config that finds gin files from the repository root, and
  nothing left behind for the next test."""
  gin.clear_config()
  for path in (".", str(REPO)):
    gin.add_config_file_search_path(path)
  yield
  gin.clear_config()
