"""`python -m tiered_routing.eval`: runs the eval binary (`cli.eval`)."""

from tiered_routing.cli import eval as eval_binary
from tiered_routing.cli import user_errors

__doc__ = eval_binary.__doc__  # What --help prints.

if __name__ == "__main__":
  user_errors.run(eval_binary.main)
