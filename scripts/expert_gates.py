r"""Expert-owned sequence gates: runs `tiered_routing.cli.add_expert`.

  python scripts/expert_gates.py --gin_file=gin/experiments/expert_gates.gin \
      --gin.MODEL_DIR="'/tmp/rm_expert_gates'"
"""

from absl import app

from tiered_routing.cli import add_expert
from tiered_routing.cli import gin_flags

if __name__ == "__main__":
  app.run(add_expert.main, flags_parser=gin_flags.parse_flags)
