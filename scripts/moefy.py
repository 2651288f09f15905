r"""MoEfication of a dense checkpoint: runs `tiered_routing.cli.moefy`.

  python scripts/moefy.py --gin_file=gin/experiments/moefication.gin \
      --gin_file=gin/experiments/moefy.gin \
      --gin.MODEL_DIR="'/tmp/rm_moefication'"
"""

from tiered_routing.cli import moefy
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(moefy.main)
