r"""Training curves of a run as a PNG (`analysis.training_curves`).

  python scripts/plot_training.py --model_dir=/tmp/tr_quickstart

reads MODEL_DIR/train/metrics.jsonl and writes MODEL_DIR/train/curves.png
(or --output): the train loss, each language's train cross-entropy and the
learning rate with the MoE layers' dropped-token fraction.
"""

import os

from absl import app
from absl import flags

from tiered_routing.analysis import training_curves
from tiered_routing.cli import user_errors
from tiered_routing.train import metrics_writer

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "A training run's MODEL_DIR.", required=True)
_OUTPUT = flags.DEFINE_string(
    "output", None, "The PNG; default MODEL_DIR/train/curves.png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path = os.path.join(_MODEL_DIR.value, "train", metrics_writer.JSONL_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"No {path}: --model_dir must be a training run's MODEL_DIR.")
  output = _OUTPUT.value or os.path.join(
      _MODEL_DIR.value, "train", "curves.png")
  written = training_curves.plot_training_curves(
      metrics_writer.read_jsonl(path), output, title=_MODEL_DIR.value)
  print(f"wrote {written}")


if __name__ == "__main__":
  user_errors.run(main)
