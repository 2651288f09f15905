r"""ESFT, router LoRA, full fine-tuning (`tiered_routing.cli.finetune_experts`).

  python scripts/finetune.py --gin_file=gin/experiments/esft.gin \
      --gin_file=gin/experiments/finetune.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"
"""

from absl import app

from tiered_routing.cli import finetune_experts
from tiered_routing.cli import gin_flags

if __name__ == "__main__":
  app.run(finetune_experts.main, flags_parser=gin_flags.parse_flags)
