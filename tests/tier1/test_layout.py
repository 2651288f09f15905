"""Tier 1 as a batch layout: golden values built by hand, and errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.tier1 import layout


def test_token_partition_ids_follow_row_major_order():
  tokens_PxBxL = np.arange(3 * 2 * 2).reshape(3, 2, 2)
  ids_T = np.asarray(layout.token_partition_ids(tokens_PxBxL.shape))
  # Token t = tokens_PxBxL.reshape(-1)[t] sits in block t // (B * L).
  np.testing.assert_array_equal(ids_T, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ids_T, tokens_PxBxL.reshape(-1) // 4)


def test_token_partition_ids_rejects_other_ranks():
  with pytest.raises(ValueError, match=r"\[P, B/P, L\]"):
    layout.token_partition_ids((4, 8))


@pytest.mark.parametrize("sharing", ["none", "attention"])
def test_global_expert_offsets_number_private_experts(sharing):
  offsets_Tx1 = layout.global_expert_offsets((2, 1, 3), 4, sharing)
  np.testing.assert_array_equal(offsets_Tx1[:, 0], [0, 0, 0, 4, 4, 4])


def test_global_expert_offsets_are_zero_for_one_pool():
  offsets_Tx1 = layout.global_expert_offsets((2, 1, 3), 4, "all")
  np.testing.assert_array_equal(offsets_Tx1, np.zeros((6, 1)))


def test_partition_expert_mask_is_block_diagonal():
  mask_PxE = np.asarray(layout.partition_expert_mask(jnp.arange(3), 3, 2))
  expected = np.array(
      [
          [1, 1, 0, 0, 0, 0],
          [0, 0, 1, 1, 0, 0],
          [0, 0, 0, 0, 1, 1],
      ],
      bool,
  )
  np.testing.assert_array_equal(mask_PxE, expected)


def test_partition_expert_mask_allows_nothing_outside_the_partitions():
  mask_TxE = np.asarray(layout.partition_expert_mask(jnp.array([-1, 2]), 2, 2))
  np.testing.assert_array_equal(mask_TxE, np.zeros((2, 4), bool))


@pytest.mark.parametrize(
    "name, value", [("num_partitions", 0), ("experts_per_partition", 1.5)]
)
def test_partition_expert_mask_rejects_bad_sizes(name, value):
  sizes = {"num_partitions": 2, "experts_per_partition": 2, name: value}
  with pytest.raises(ValueError, match=f"{name} must be a positive int"):
    layout.partition_expert_mask(jnp.arange(2), **sizes)


def test_checked_partitions_returns_a_list():
  assert layout.checked_partitions("owners", (1, 0), 2) == [1, 0]


@pytest.mark.parametrize("bad", [[], [2], [-1], [0, 5]])
def test_checked_partitions_names_the_value_and_the_range(bad):
  with pytest.raises(ValueError) as info:
    layout.checked_partitions("owners", bad, 2)
  assert str(info.value) == (
      f"owners={bad!r}; allowed: a non-empty list of partitions in [0, 2)."
  )
