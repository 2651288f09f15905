"""The mask method scores the masked model without dropping a slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import losses
from tiered_routing.model import transformer
from tiered_routing.unlearning import mask_method

CONFIG = decoder_config.DecoderConfig(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    head_dim=8,
    num_layers=1,
    moe_every=1,
    num_experts=4,
    expert_d_ff=8,
    top_k=2,
    capacity_factor=1.25,
    group_size=64,
    dispatch="sort_gather",
)


def test_capacity_is_scaled_for_the_remaining_experts():
  critical = np.zeros((2, 1, 4), bool)
  critical[0, 0, :2] = True  # Layer 0 loses 2 of 4 experts, layer 1 one.
  critical[1, 0, 3] = True
  config = mask_method.capacity_for_remaining(CONFIG, critical)
  assert config.capacity_factor == pytest.approx(1.25 * 4 / 2)
  assert mask_method.capacity_for_remaining(
      CONFIG, np.zeros((1, 1, 4), bool)
  ) == CONFIG
  with pytest.raises(ValueError, match="leaves no expert of 4"):
    mask_method.capacity_for_remaining(CONFIG, np.ones((1, 1, 4), bool))


def _dropped(config, mask_MxPxE):
  model = transformer.TieredDecoder(config)
  tokens = jax.random.randint(jax.random.key(0), (1, 4, 32), 1, 64)
  params = model.init(jax.random.key(1), tokens)["params"]
  batch = {
      "decoder_input_tokens": tokens,
      "decoder_segment_ids": jnp.ones_like(tokens),
      "decoder_positions": jnp.broadcast_to(jnp.arange(32), tokens.shape),
  }
  out = forward_lib.forward(
      model,
      params,
      batch,
      expert_mask_MxPxE=jnp.asarray(mask_MxPxE),
      keep_intermediates=True,
  )
  return float(losses.router_metrics(out.intermediates)["dropped_fraction"])


def test_masked_model_drops_no_slot_with_the_scaled_capacity():
  critical = np.zeros((1, 1, 4), bool)
  critical[0, 0, :2] = True  # Top-2 of the 2 experts left: all on both.
  assert _dropped(CONFIG, ~critical) > 0.3  # 1 - 1.25 * 2 / 4 = 0.375.
  scaled = mask_method.capacity_for_remaining(CONFIG, critical)
  assert _dropped(scaled, ~critical) == 0.0
