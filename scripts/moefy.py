r"""MoEfication of a dense checkpoint: runs `tiered_routing.cli.moefy`.

  python scripts/moefy.py --gin_file=gin/experiments/moefication.gin \
      --gin_file=gin/experiments/moefy.gin \
      --gin.MODEL_DIR="'/tmp/rm_moefication'"
"""

from absl import app

from tiered_routing.cli import gin_flags
from tiered_routing.cli import moefy

if __name__ == "__main__":
  app.run(moefy.main, flags_parser=gin_flags.parse_flags)
