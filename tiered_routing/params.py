"""`python -m tiered_routing.params`, the v1 command: runs
`python -m tiered_routing.cli.count_params` (the parameter-count binary)."""

from absl import app

from tiered_routing.cli import count_params
from tiered_routing.cli import gin_flags

if __name__ == "__main__":
  app.run(count_params.main, flags_parser=gin_flags.parse_flags)
