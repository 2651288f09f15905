r"""Expert-owned sequence gates: runs `tiered_routing.cli.add_expert`.

  python scripts/expert_gates.py --gin_file=gin/experiments/expert_gates.gin \
      --gin.MODEL_DIR="'/tmp/rm_expert_gates'"
"""

from tiered_routing.cli import add_expert
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(add_expert.main)
