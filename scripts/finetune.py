r"""ESFT, router LoRA, full fine-tuning (`tiered_routing.cli.finetune_experts`).

  python scripts/finetune.py --gin_file=gin/experiments/esft.gin \
      --gin_file=gin/experiments/finetune.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"
"""

from tiered_routing.cli import finetune_experts
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(finetune_experts.main)
