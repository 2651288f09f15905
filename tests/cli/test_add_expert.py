"""The add_expert binary's token-level comparison helper."""

import numpy as np

from tiered_routing.cli import add_expert


def test_reached_in_segment_is_a_running_any_per_segment():
  # Routing is causal per segment: a token is marked once any token of its
  # segment at or before it is on the expert, and the mark resets at the
  # next segment (padding, id 0, is a segment of its own).
  on = np.array([[0, 1, 0, 0, 0, 0, 1, 0],
                 [0, 0, 0, 0, 0, 0, 0, 1],
                 [1, 0, 0, 0, 0, 0, 0, 0]], bool)
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0],
                  [1, 1, 2, 2, 3, 3, 3, 3],
                  [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
      add_expert._reached_in_segment(on, seg),
      [[0, 1, 1, 0, 0, 0, 1, 0],
       [0, 0, 0, 0, 0, 0, 0, 1],
       [1, 1, 1, 1, 1, 1, 1, 1]])
