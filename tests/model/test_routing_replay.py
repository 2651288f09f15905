"""Routing replay: a per-token expert mask makes a model route as another."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import forward
from tiered_routing.model import routing_capture
from tiered_routing.model import transformer

P, B, L = 2, 2, 6


@functools.lru_cache(maxsize=None)
def _model(sharing: str, top_k: int):
  config = decoder_config.DecoderConfig(
      vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_layers=2,
      d_ff=16, num_experts=4, expert_d_ff=8, top_k=top_k, moe_every=1,
      num_partitions=P, sharing=sharing, group_size=2 * L,
      dispatch="reference", capacity_factor=4.0,
  )
  model = transformer.TieredDecoder(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (P, B, L), 1, 32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  return config, model, {"decoder_input_tokens": tokens}, params


def _routed(model, params, batch, **masks):
  out = forward.forward(model, params, batch, capture_routing=True, **masks)
  return out.logits_PxBxLxV, out.routing


def _new_router(params):
  """The same experts behind routers with other weights."""
  def swap(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    if "router" in names:
      return -x[..., ::-1]
    return x
  return jax.tree_util.tree_map_with_path(swap, params)


@pytest.mark.parametrize("sharing", ["none", "attention", "all"])
def test_replaying_own_routing_changes_nothing(sharing):
  config, model, batch, params = _model(sharing, 2)
  logits, routing = _routed(model, params, batch)
  mask = routing_capture.replay_mask(
      routing, (P, B, L), config.experts_per_layer
  )
  replayed, again = _routed(
      model, params, batch, expert_mask_MxPxBxLxE=mask
  )
  np.testing.assert_allclose(replayed, logits, atol=1e-5)
  np.testing.assert_array_equal(
      again.expert_index_MxTxK, routing.expert_index_MxTxK
  )


@pytest.mark.parametrize("sharing", ["none", "attention", "all"])
def test_a_moved_routing_is_undone_by_replay(sharing):
  # Top-1: a token's one expert gets weight 1 whatever the router's score,
  # so with the original routing replayed the new-router model computes
  # exactly the original's function.
  config, model, batch, params = _model(sharing, 1)
  logits, routing = _routed(model, params, batch)
  moved = _new_router(params)
  moved_logits, moved_routing = _routed(model, moved, batch)
  assert not np.array_equal(
      moved_routing.expert_index_MxTxK, routing.expert_index_MxTxK
  )
  assert float(jnp.max(jnp.abs(moved_logits - logits))) > 1e-3
  mask = routing_capture.replay_mask(
      routing, (P, B, L), config.experts_per_layer
  )
  replayed, _ = _routed(model, moved, batch, expert_mask_MxPxBxLxE=mask)
  np.testing.assert_allclose(replayed, logits, atol=1e-5)


def test_mask_shape_and_exclusivity_are_checked():
  config, model, batch, params = _model("none", 2)
  m = len(config.moe_layers)
  with pytest.raises(ValueError, match="expert_mask_MxPxBxLxE has shape"):
    forward.forward(model, params, batch,
                    expert_mask_MxPxBxLxE=jnp.ones((m, P, B, L, 3), bool))
  with pytest.raises(ValueError, match="at most one"):
    forward.forward(model, params, batch,
                    expert_mask_PxE=jnp.ones((P, 4), bool),
                    expert_mask_MxPxBxLxE=jnp.ones((m, P, B, L, 4), bool))
