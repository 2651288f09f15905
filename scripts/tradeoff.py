r"""The trade-off sweep (`tiered_routing.cli.tradeoff`) at the README's path.

  python scripts/tradeoff.py --preset=sample --output_dir=/tmp/tradeoff_sample
"""

from absl import app

from tiered_routing.cli import gin_flags
from tiered_routing.cli import tradeoff

if __name__ == "__main__":
  app.run(tradeoff.main, flags_parser=gin_flags.parse_flags)
