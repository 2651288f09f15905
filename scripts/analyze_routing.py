r"""Routing statistics of a checkpoint (`tiered_routing.cli.analyze_routing`).

  python scripts/analyze_routing.py --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'" \
      --output_dir=/tmp/tr_quickstart/routing
"""

from tiered_routing.cli import analyze_routing
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(analyze_routing.main)
