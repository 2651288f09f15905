r"""Routing statistics of a checkpoint (`tiered_routing.cli.analyze_routing`).

  python scripts/analyze_routing.py --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'" \
      --output_dir=/tmp/tr_quickstart/routing
"""

from absl import app

from tiered_routing.cli import analyze_routing
from tiered_routing.cli import gin_flags

if __name__ == "__main__":
  app.run(analyze_routing.main, flags_parser=gin_flags.parse_flags)
