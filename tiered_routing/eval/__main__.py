"""`python -m tiered_routing.eval`: runs the eval binary (`cli.eval`)."""

from absl import app

from tiered_routing.cli import eval as eval_binary
from tiered_routing.cli import gin_flags

if __name__ == "__main__":
  app.run(eval_binary.main, flags_parser=gin_flags.parse_flags)
