"""`python -m tiered_routing.train`: runs the train binary (`cli.train`)."""

from tiered_routing.cli import train
from tiered_routing.cli import user_errors

__doc__ = train.__doc__  # What --help prints.

if __name__ == "__main__":
  user_errors.run(train.main)
