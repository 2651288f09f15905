r"""The trade-off sweep (`tiered_routing.cli.tradeoff`) at the README's path.

  python scripts/tradeoff.py --preset=sample --output_dir=/tmp/tradeoff_sample
"""

from tiered_routing.cli import tradeoff
from tiered_routing.cli import user_errors

if __name__ == "__main__":
  user_errors.run(tradeoff.main)
