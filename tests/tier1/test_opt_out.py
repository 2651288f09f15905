"""Opt-out at inference: the posterior over the partitions left on."""

import numpy as np
import pytest

from tiered_routing.tier1 import opt_out
from tiered_routing.tier1 import schemes


def test_restrict_posterior_golden():
  enabled = opt_out.enabled_mask(3, [1])
  np.testing.assert_array_equal(enabled, [True, False, True])
  post = opt_out.restrict_posterior(
      [[0.2, 0.6, 0.2], [0.0, 1.0, 0.0]], enabled
  )
  # Mass on the disabled partition is dropped and the rest renormalized;
  # a row with nothing left becomes uniform over the partitions on.
  np.testing.assert_allclose(post, [[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]])


def test_partitions_of_languages_and_checks():
  family4 = schemes.family(4)
  assert opt_out.partitions_of(family4, ["ur", "fa", "en"]) == (2, 3)
  assert opt_out.check_disabled([3, 1, 3], 4) == (1, 3)
  with pytest.raises(ValueError, match="allowed: ints in 0..3"):
    opt_out.check_disabled([-1], 4)
  with pytest.raises(ValueError, match="at least one must stay on"):
    opt_out.enabled_mask(2, [0, 1])
