"""A command-line macro that no loaded gin file uses is an error."""

import gin
import pytest

from tiered_routing.cli import gin_flags
from tiered_routing.cli import train  # pylint: disable=unused-import


def _write(path, text):
  path.write_text(text)
  return str(path)


@pytest.fixture
def files(tmp_path):
  """main.gin includes base.gin; STEPS is used in base.gin only."""
  _write(tmp_path / "base.gin",
         "STEPS = 10\nfoo.steps = %STEPS\nfoo.rate = %RATE\n")
  main = _write(tmp_path / "main.gin",
                "include 'base.gin'\nRATE = 0.1\nUNUSED_IN_FILE = 3\n")
  return main, [str(tmp_path)]


@pytest.mark.parametrize("bindings", [
    ["STEPS = 20"],             # Used in an included file.
    ["RATE = 0.5"],             # Used in an included file, set in main.
    ["OTHER = 1", "RATE = %OTHER"],  # Used by another binding.
    ["foo.steps = 3"],          # Not a macro.
    ["MODEL_DIR = '/x'"],       # Required by the binary.
])
def test_used_macros_pass(files, bindings):
  main, paths = files
  gin_flags.check_macros_used([main], bindings, paths, ("MODEL_DIR",))


def test_a_misspelled_macro_names_the_close_matches(files):
  main, paths = files
  with pytest.raises(ValueError, match=(
      r"macro STEP \(--gin\.STEP\) is not used by any loaded gin file.*"
      r"Did you mean STEPS\?")):
    gin_flags.check_macros_used([main], ["STEP = 20"], paths)
  with pytest.raises(ValueError, match="UNUSED_IN_FILE"):
    gin_flags.check_macros_used([main], ["UNUSED_IN_FILE = 4"], paths)


def test_parse_gin_refuses_train_step_for_train_steps():
  """The issue's case, through the quickstart's real files."""
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="Did you mean TRAIN_STEPS"):
      gin_flags.parse_gin(
          ["gin/quickstart.gin"],
          ["MODEL_DIR = '/tmp/unused'", "TRAIN_STEP = 20"],
          [".", gin_flags.REPO_ROOT],
      )
  finally:
    gin.clear_config()
