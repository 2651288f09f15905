"""`python -m tiered_routing.train`: runs the train binary (`cli.train`)."""

from absl import app

from tiered_routing.cli import gin_flags
from tiered_routing.cli import train

if __name__ == "__main__":
  app.run(train.main, flags_parser=gin_flags.parse_flags)
