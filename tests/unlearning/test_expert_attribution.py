"""Tests for expert attribution, router masks and captured token routing."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import losses
from tiered_routing.model import routing_capture
from tiered_routing.tier1 import layout
from tiered_routing.unlearning import expert_attribution as ea

# Planted per-token frequencies (top-2 routing: each row sums to 2). Expert 1
# is rare but forget-specific, expert 0 is used by forget a lot and by retain
# somewhat, expert 3 is a retain expert.
FORGET = np.array([[0.9, 0.3, 0.5, 0.3], [0.1, 0.1, 1.7, 0.1]])
RETAIN = np.array([[0.3, 0.02, 0.7, 0.98], [0.5, 0.5, 0.5, 0.5]])


def test_scores_golden():
  s = ea.expert_scores(FORGET, RETAIN, "log_ratio", smoothing=0.1)
  # a = 0.1 * mean(retain row) = 0.05 in both layers.
  np.testing.assert_allclose(s[0, 1], math.log(0.35 / 0.07))
  np.testing.assert_allclose(s[0, 0], math.log(0.95 / 0.35))
  np.testing.assert_allclose(s[1, 2], math.log(1.75 / 0.55))
  np.testing.assert_allclose(
      ea.expert_scores(FORGET, RETAIN, "difference"), FORGET - RETAIN
  )
  np.testing.assert_array_equal(
      ea.expert_scores(FORGET, RETAIN, "forget_frequency"), FORGET
  )


def test_top_m_differs_by_score():
  ratio, _ = ea.critical_experts(FORGET, RETAIN, ea.AttributionConfig())
  np.testing.assert_array_equal(ratio, [[0, 1, 0, 0], [0, 0, 1, 0]])
  diff, _ = ea.critical_experts(
      FORGET, RETAIN, ea.AttributionConfig(score="difference", top_m=2)
  )
  # Layer 1 ties e0, e1, e3 at -0.4: the lower index wins.
  np.testing.assert_array_equal(diff, [[1, 1, 0, 0], [1, 0, 1, 0]])


def test_top_m_ties_go_to_lower_index():
  crit = ea.select_top_m(np.zeros((1, 4)), 2)
  np.testing.assert_array_equal(crit, [[1, 1, 0, 0]])
  np.testing.assert_array_equal(
      ea.select_top_m(np.ones((2, 3)), 0), np.zeros((2, 3), bool)
  )


def test_threshold_and_coverage():
  s = ea.expert_scores(FORGET, RETAIN)
  np.testing.assert_array_equal(
      ea.select_threshold(s, math.log(2.0)), [[1, 1, 0, 0], [0, 0, 1, 0]]
  )
  # Layer 0 order by score: e1 (15% of forget mass), e0 (45%), e2, e3.
  np.testing.assert_array_equal(
      ea.select_by_coverage(s, FORGET, 0.5)[0], [1, 1, 0, 0]
  )
  np.testing.assert_array_equal(
      ea.select_by_coverage(s, FORGET, 0.15)[0], [0, 1, 0, 0]
  )
  # Layer 1: e2 alone carries 85%.
  np.testing.assert_array_equal(
      ea.select_by_coverage(s, FORGET, 0.85)[1], [0, 0, 1, 0]
  )


def test_selection_validation():
  s = ea.expert_scores(FORGET, RETAIN)
  with pytest.raises(ValueError, match="top_m=4"):
    ea.select_top_m(s, 4)
  with pytest.raises(ValueError, match=r"layer\(s\) \[0, 1\]"):
    ea.select_threshold(s, -100.0)
  with pytest.raises(ValueError, match="coverage=0"):
    ea.select_by_coverage(s, FORGET, 0)
  with pytest.raises(ValueError, match="every expert"):
    ea.select_by_coverage(s, np.ones((2, 4)), 1.0)
  with pytest.raises(ValueError, match="finite and >= 0"):
    ea.expert_scores(-FORGET, RETAIN)
  with pytest.raises(ValueError, match="one shape"):
    ea.expert_scores(FORGET, RETAIN[:1])
  with pytest.raises(ValueError, match="'ratio'"):
    ea.AttributionConfig(score="ratio")
  with pytest.raises(ValueError, match="'topm'"):
    ea.AttributionConfig(selection="topm")


def test_routing_counts_golden():
  routing = routing_capture.TokenRouting(
      expert_index_MxTxK=jnp.array([[[0, 1], [1, 2], [0, 3]]]),
      combine_weights_MxTxK=jnp.array([[[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]]]),
      layer_names=("moe",),
  )
  counts, n = ea.routing_counts(routing, 4)
  np.testing.assert_allclose(counts, [[2, 2, 0, 1]])
  assert float(n) == 3
  mass, _ = ea.routing_counts(routing, 4, weighting="mass")
  np.testing.assert_allclose(mass, [[1.1, 1.4, 0, 0.5]], rtol=1e-6)
  counts, n = ea.routing_counts(routing, 4, jnp.array([True, False, True]))
  np.testing.assert_allclose(counts, [[2, 1, 0, 1]])
  assert float(n) == 2
  with pytest.raises(ValueError, match=r"expected \(3,\)"):
    ea.routing_counts(routing, 4, jnp.ones((2,), bool))
  with pytest.raises(ValueError, match="'weights'"):
    ea.routing_counts(routing, 4, weighting="weights")


def test_router_mask_and_shared_layer_mask():
  crit = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], bool)
  allowed = ea.router_mask(crit, 3, partitions=[1])
  assert allowed.shape == (2, 3, 4)
  assert allowed[:, [0, 2]].all()
  np.testing.assert_array_equal(allowed[:, 1], ~crit)
  np.testing.assert_array_equal(ea.router_mask(crit, 2)[1], ~crit[[1, 1]])
  np.testing.assert_array_equal(
      ea.shared_layer_mask(allowed), [[1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]]
  )
  base = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)  # tier-1 blocks
  both = ea.router_mask(crit, 2, None, base)
  np.testing.assert_array_equal(both[0], [[0, 1, 0, 0], [0, 0, 1, 1]])
  with pytest.raises(ValueError, match=r"partitions \[3\]"):
    ea.router_mask(crit, 3, partitions=[3])
  with pytest.raises(ValueError, match="base_mask_PxE"):
    ea.router_mask(crit, 3, None, base)
  with pytest.raises(ValueError, match=r"partitions \[0\] no expert"):
    ea.shared_layer_mask(np.array([[[1, 0]], [[0, 1]]], bool))
  np.testing.assert_array_equal(
      ea.decoder_mask_kwargs(allowed)["expert_mask_MxPxE"], allowed
  )
  with pytest.raises(ValueError, match=r"\[M, P, E\]"):
    ea.decoder_mask_kwargs(allowed[0])


P, B, L, E = 2, 2, 6, 4  # The conftest's tiny model.


# 'attention' lays out private FFNs like 'none' ([P, G, S] groups).
@pytest.mark.parametrize("sharing", ["none", "all"])
def test_captured_routing_follows_token_order(sharing, tiny_model):
  tiny = tiny_model(sharing)
  variables, tokens = tiny.variables, tiny.tokens
  e_total = tiny.config.experts_per_layer
  # Partition p may only use experts {2p, 2p+1} (of its own block for 'all'),
  # and token (p=1, b=0, l=4) is padding.
  mask = np.zeros((P, e_total), bool)
  for p in range(P):
    first = (p * E if sharing == "all" else 0) + 2 * p
    mask[p, first : first + 2] = True
  seg = jnp.ones((P, B, L), jnp.int32).at[1, 0, 4].set(0)
  _, routing, inter = tiny.routed_forward(
      variables["params"],
      {"decoder_input_tokens": tokens, "decoder_segment_ids": seg},
      expert_mask_PxE=jnp.asarray(mask),
  )
  assert routing.layer_names == ("decoder/layers_0/moe", "decoder/layers_1/moe")
  assert routing.expert_index_MxTxK.shape == (2, P * B * L, 2)
  pid = layout.token_partition_ids((P, B, L))
  idx = np.asarray(routing.expert_index_MxTxK)
  used = np.asarray(routing.combine_weights_MxTxK) > 0
  allowed_for_token = mask[np.asarray(pid)]  # [T, E]
  assert np.take_along_axis(allowed_for_token[None], idx, -1)[used].all()
  pad_t = 1 * B * L + 0 * L + 4
  assert not used[:, pad_t].any()
  # Router slots, before any capacity drop: 2 per real token and layer.
  assert used.sum() == 2 * (P * B * L - 1) * 2
  # The captured outputs do not leak into the router losses: they equal the
  # sum over layers of the sown values alone.
  layers = inter["decoder"]
  for name in ("load_balance_loss", "router_z_loss"):
    want = sum(
        float(jnp.mean(layers[f"layers_{i}"]["moe"][name][0])) for i in range(2)
    )
    got = losses.collect_router_losses(inter)[name]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_token_routing_errors():
  with pytest.raises(ValueError, match="capture_intermediates"):
    routing_capture.token_routing(
        {"decoder": {"moe": {"load_balance_loss": (1.0,)}}}
    )
  with pytest.raises(ValueError, match=r"\[P, B/P, L\]"):
    layout.token_partition_ids((2, 3))


def test_attribution_end_to_end_masks_critical_experts(tiny_model):
  tiny = tiny_model("none")
  # Forget data lives in partition 0 only (partition 1 rows are padding).
  seg = jnp.ones((P, B, L), jnp.int32).at[1].set(0)
  _, routing, _ = tiny.routed_forward(
      tiny.params,
      {"decoder_input_tokens": tiny.tokens, "decoder_segment_ids": seg},
  )
  forget_mask = np.asarray(seg).reshape(-1) > 0
  f_counts, n_f = ea.routing_counts(routing, E, forget_mask)
  r_counts, n_r = ea.routing_counts(routing, E)
  crit, _ = ea.critical_experts(
      np.asarray(f_counts / n_f),
      np.asarray(r_counts / n_r),
      ea.AttributionConfig(score="forget_frequency"),
  )
  # forget_frequency top-1 is the most used expert of each layer.
  np.testing.assert_array_equal(
      crit.argmax(-1), np.asarray(f_counts).argmax(-1)
  )
  # The layers disagree (seed-dependent), so per-layer and shared masks differ.
  assert (crit[0] != crit[1]).any()
  allowed = ea.router_mask(crit, P, partitions=[0])
  # Default: each MoE layer loses only its own critical experts.
  kwargs = ea.decoder_mask_kwargs(allowed)
  assert set(kwargs) == {"expert_mask_MxPxE"}
  _, masked, _ = tiny.routed_forward(
      tiny.params,
      {"decoder_input_tokens": tiny.tokens, "decoder_segment_ids": seg},
      **kwargs,
  )
  counts = np.asarray(ea.routing_counts(masked, E, forget_mask)[0])
  np.testing.assert_array_equal(counts[crit], 0.0)
  # Top-2 routing over the 3 experts left: each is still used somewhere.
  assert (counts[~crit] > 0).all()
  # The explicit shared option removes the union in every layer.
  kwargs = ea.decoder_mask_kwargs(allowed, per_layer=False)
  shared = kwargs["expert_mask_PxE"]
  np.testing.assert_array_equal(shared, ea.shared_layer_mask(allowed))
  _, masked, _ = tiny.routed_forward(
      tiny.params,
      {"decoder_input_tokens": tiny.tokens, "decoder_segment_ids": seg},
      **kwargs,
  )
  counts = np.asarray(ea.routing_counts(masked, E, forget_mask)[0])
  removed = ~shared[0]
  assert removed.sum() == crit.any(0).sum()
  np.testing.assert_array_equal(counts[:, removed], 0.0)
