"""Test-wide setup: 8 simulated CPU devices, fast CPU compiles, quiet TF.

XLA reads its flags once, when the backend starts, so they are set here before
any test module imports jax. The tests compile many small programs and run
each for a few steps, so XLA's expensive CPU optimisation passes cost far more
than they save; turning them off changes no result a test checks (runs that
are compared with each other are compiled the same way).

Tests build the same small models again and again, and every new `jax.jit`
of a closure compiles anew; one persistent compilation cache for the run
(a fresh directory, made by the first process, inherited by the xdist
workers and by the train and eval binaries the tests start unless a test
names its own, removed at the end; the trade-off binary keeps its own in
its output directory, as a user's sweep does) loads a program compiled
once instead. Programs that compile in under 0.1 s are not kept: keeping
every one made tests/cli/test_tradeoff_sources.py and
tests/unlearning/test_runner.py slower (375 s together, against 344 s
keeping those over 0.1 s; most of their repeats are within one process,
where jax's in-memory cache serves them). A cached
executable is the one XLA compiled for the same program and flags (the
flags are part of the key), so no result changes; an entry read while
another process writes it is recompiled (JAX warns). Measured with `-n 2`:
tests/model, related, eval and analysis 152 s without, 137 s with; the
whole suite 17 min 3 s without, 15 min 13 s with.
"""

import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="tiered_routing_tests_xla_")
  _OWN_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE_DIR = None  # The caller's (or the xdist controller's) cache.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

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


def pytest_collection_modifyitems(config, items):
  """The files that hold a `heavy` test first, each file's tests together
  and in order (pytest.ini says why)."""
  del config
  heavy = {item.path for item in items if item.get_closest_marker("heavy")}
  items.sort(key=lambda item: item.path not in heavy)


def pytest_unconfigure(config):
  """The process that made the run's compilation cache removes it."""
  del config
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
