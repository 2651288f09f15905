"""Library noise is filtered from the console; everything else prints."""

import logging
import os
import subprocess
import sys

from absl import flags
import pytest

from tiered_routing.cli import quiet_logs


def _record(level, path, message):
  return logging.LogRecord("absl", level, path, 1, message, None, None)


pytestmark = pytest.mark.usefixtures("parsed_flags")


@pytest.mark.parametrize("level, path, message, shown", [
    (logging.INFO, "/site-packages/orbax/checkpoint/x.py", "Renaming", False),
    (logging.INFO, "/site-packages/seqio/utils.py", "Automatically", False),
    (logging.INFO, "/site-packages/jax/_src/xla_bridge.py",
     "Unable to initialize backend 'tpu'", False),
    (logging.WARNING, "/site-packages/seqio/dataset_providers.py",
     "Using an uncached FunctionDataset for training is not ...", False),
    (logging.WARNING, "/site-packages/orbax/checkpoint/m.py",
     "Given directory is read only=/x", False),
    # Kept: other warnings of the same libraries, errors, our own INFO.
    (logging.WARNING, "/site-packages/orbax/checkpoint/m.py",
     "Something else went wrong", True),
    (logging.ERROR, "/site-packages/seqio/utils.py", "broken", True),
    (logging.INFO, "/work/tiered_routing/train/metrics_writer.py",
     "step 10/20 | loss 8.8", True),
])
def test_filter(level, path, message, shown):
  noise = quiet_logs.LibraryNoise()
  assert noise.filter(_record(level, path, message)) is shown
  flags.FLAGS.library_logs = True
  assert noise.filter(_record(level, path, message)) is True


def test_no_cuinit_error_without_an_nvidia_driver():
  if os.path.exists("/proc/driver/nvidia"):
    pytest.skip("a machine with an NVIDIA driver initializes CUDA")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run(
      [sys.executable, "-c",
       "import tiered_routing.cli, tensorflow as tf; "
       "tf.config.list_physical_devices(); print('ok')"],
      capture_output=True, text=True, env=env, timeout=300, check=True)
  assert proc.stdout.strip() == "ok"
  assert "cuInit" not in proc.stderr
