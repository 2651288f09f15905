"""Fixtures of the binaries' tests."""

from absl import flags
from absl.testing import flagsaver
import pytest


@pytest.fixture
def parsed_flags():
  """absl flags parsed (defaults), and every flag a test sets restored."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  with flagsaver.flagsaver():
    yield flags.FLAGS
