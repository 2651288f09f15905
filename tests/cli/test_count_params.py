"""Tests for the parameter-count binary (`cli.count_params`)."""

import pathlib

from tiered_routing.cli import configurables
from tiered_routing.cli import count_params
from tiered_routing.cli import gin_flags
from tiered_routing.model import param_count

MODELS = pathlib.Path(__file__).resolve().parents[2] / "gin" / "models"


def test_binary_prints_table(clean_gin, capsys):
  argv = gin_flags.parse_flags([
      "params", f"--gin_file={MODELS / 'tiny.gin'}", "--gin.VOCAB_SIZE=100"])
  try:
    count_params.main(argv)
  finally:
    gin_flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  config = configurables.DecoderConfig()
  assert config.vocab_size == 100
  count = param_count.count_params(config)
  assert f"{count.total:,d}" in out
  assert f"{count.active:,d}" in out
  assert "active per token" in out
  # The README's table columns: the widths are printed too.
  assert int(out.split("d_model")[1].split()[0]) == config.d_model
  assert int(out.split("expert d_ff")[1].split()[0]) == config.expert_d_ff
