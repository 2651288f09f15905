"""Equal-total families: every member within 5% of n = 1, and errors."""

import dataclasses

import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import size_family

BASE = decoder_config.DecoderConfig(
    vocab_size=256,
    d_model=64,
    num_heads=8,
    head_dim=8,
    num_layers=2,
    moe_every=1,
    num_experts=16,
    expert_d_ff=32,
    top_k=2,
)


# Dense FFNs in every other layer (private under 'attention' and 'none').
ALTERNATING = dataclasses.replace(BASE, moe_every=2, d_ff=128)


@pytest.mark.parametrize("base", [BASE, ALTERNATING], ids=["moe", "alt"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("sharing", decoder_config.SHARING_LEVELS)
def test_members_hold_the_total_and_split_the_experts(base, n, sharing):
  config = size_family.member(base, n, sharing)
  total = size_family.total_params(config)
  base_total = size_family.total_params(base)
  assert config.num_partitions == n and config.sharing == sharing
  assert config.num_experts * n == base.num_experts
  if sharing == "none":
    assert abs(total - base_total) <= 0.05 * base_total
    assert config.d_model < base.d_model
    assert config.expert_d_ff >= base.expert_d_ff
    assert config.num_heads * config.head_dim == config.d_model
  else:  # Shared width, the base's experts regrouped: the same total.
    assert total == base_total
    assert config.d_model == base.d_model


def test_none_members_are_the_widest_that_keep_expert_width():
  widths = [size_family.member(BASE, n, "none").d_model for n in (1, 2, 4, 8)]
  assert widths == sorted(widths, reverse=True) and widths[0] == 64
  for n in (2, 4, 8):
    config = size_family.member(BASE, n, "none")
    wider = config.d_model + BASE.head_dim
    # One head wider, the expert width restoring the total would shrink
    # below the base's.
    solved = size_family._solve_expert_width(
        BASE, n, wider, size_family.total_params(BASE)
    )
    assert solved < BASE.expert_d_ff, (n, wider, solved)


_EMBEDDING_HEAVY = dataclasses.replace(
    BASE, vocab_size=4096, d_model=16, num_heads=2, expert_d_ff=1
)


@pytest.mark.parametrize(
    "base, n, message",
    [
        (dataclasses.replace(BASE, num_partitions=2), 2, "got 2"),
        (BASE, 3, "must divide the base's num_experts=16"),
        (BASE, 16, "leaves 1 experts per partition; allowed: at least"),
        (dataclasses.replace(BASE, d_model=60), 2, "multiple of its head_"),
        # Embeddings hold most of the total: 8 private copies of even the
        # narrowest (one head) exceed it.
        (_EMBEDDING_HEAVY, 8, "within 5%"),
    ],
)
def test_bad_families_are_refused_naming_the_value(base, n, message):
  with pytest.raises(ValueError, match=message):
    size_family.member(base, n, "none")
