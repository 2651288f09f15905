"""The generate binary's partition choice, with opt-out at inference."""

import pytest

from tiered_routing.cli import generate
from tiered_routing.tier1 import schemes

FAMILY4 = schemes.family(4)


def test_language_picks_its_partition():
  assert generate.resolve_partition(FAMILY4, "ur", None) == 2
  assert generate.resolve_partition(FAMILY4, None, 1) == 1
  with pytest.raises(ValueError, match="belongs to partition 2"):
    generate.resolve_partition(FAMILY4, "ur", 1)
  with pytest.raises(ValueError, match="Give --language"):
    generate.resolve_partition(FAMILY4, None, None)


def test_opted_out_partition_is_refused_by_name():
  assert generate.resolve_partition(FAMILY4, "en", None, [2]) == 3
  with pytest.raises(
      ValueError,
      match=r"Partition 2 \(--language=ur\) is opted out .*\[0, 1, 3\]",
  ):
    generate.resolve_partition(FAMILY4, "ur", None, [2])
  with pytest.raises(ValueError, match="allowed: ints in 0..3"):
    generate.resolve_partition(FAMILY4, "ur", None, [7])
