r"""Text from one partition of a checkpoint (`tiered_routing.cli.generate`).

  python scripts/generate.py --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'" --language=en \
      --prompt="Everyone has the right" --max_new_tokens=32
"""

from tiered_routing.cli import generate
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(generate.main)
