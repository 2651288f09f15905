r"""Prints the parameter counts of a model config given by gin files.

  python -m tiered_routing.cli.count_params --gin_file=gin/models/n16.gin \
      [--gin_bindings="SHARING = 'attention'"] [--gin.VOCAB_SIZE=250112]

The gin flags are the train / eval binaries' (`gin_flags`); the counts and
their categories are `model.param_count`'s.
"""

from typing import Sequence


from tiered_routing.cli import configurables
from tiered_routing.cli import gin_flags
from tiered_routing.cli import user_errors
from tiered_routing.model import param_count


def main(argv: Sequence[str]) -> None:
  gin_flags.parse_command_line(argv)
  print(param_count.format_table(configurables.DecoderConfig()))


if __name__ == "__main__":
  user_errors.run(main)
