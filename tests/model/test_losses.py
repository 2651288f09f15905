"""Tests for tiered_routing.model.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import losses
from tiered_routing.model import routing
from tiered_routing.model import transformer


def _ce(logits, target):
  """Cross-entropy of one token written out with the math module."""
  lse = math.log(sum(math.exp(v) for v in logits))
  return lse - logits[target], lse


def test_cross_entropy_hand_values():
  logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
  (ce0, lse0), (ce1, lse1) = _ce(logits[0], 2), _ce(logits[1], 1)
  loss_sum, weight_sum, per_token = losses.cross_entropy_loss(
      jnp.array(logits), jnp.array([2, 1]), jnp.array([1.0, 0.5]))
  np.testing.assert_allclose(per_token, [ce0, 0.5 * ce1], rtol=1e-6)
  np.testing.assert_allclose(loss_sum, ce0 + 0.5 * ce1, rtol=1e-6)
  assert float(weight_sum) == 1.5
  _, _, per_token = losses.cross_entropy_loss(
      jnp.array(logits), jnp.array([2, 1]), jnp.array([1.0, 0.5]), z_loss=0.1)
  np.testing.assert_allclose(
      per_token, [ce0 + 0.1 * lse0**2, 0.5 * (ce1 + 0.1 * lse1**2)], rtol=1e-6)


def test_cross_entropy_is_stable_and_float32():
  logits = jnp.array([[1000.0, 0.0, -1000.0]], jnp.bfloat16)
  loss_sum, weight_sum, per_token = losses.cross_entropy_loss(
      logits, jnp.array([1]))
  assert per_token.dtype == jnp.float32 and float(weight_sum) == 1.0
  np.testing.assert_allclose(loss_sum, 1000.0, rtol=1e-6)
  _, _, per_token = losses.cross_entropy_loss(logits, jnp.array([0]))
  assert float(per_token[0]) == 0.0


def test_cross_entropy_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="targets shape"):
    losses.cross_entropy_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), int))
  with pytest.raises(ValueError, match="weights shape"):
    losses.cross_entropy_loss(jnp.zeros((2, 5)), jnp.zeros((2,), int),
                              jnp.ones((3,)))


def _sown_tree():
  """Two MoE layers under a partition vmap (leading axis P = 2)."""
  def layer(lb, z, usage, dropped, entropy):
    return {"moe": {"load_balance_loss": (jnp.array(lb),),
                    "router_z_loss": (jnp.array(z),),
                    "expert_usage_E": (jnp.array(usage),),
                    "dropped_fraction": (jnp.array(dropped),),
                    "router_entropy": (jnp.array(entropy),)}}
  return {"intermediates": {"decoder": {
      "layers_1": layer([1.0, 3.0], [0.5, 0.5], [[1.0, 0.0], [0.5, 0.5]],
                        [0.0, 0.2], [0.4, 0.6]),
      "layers_3": layer([2.0, 2.0], [1.0, 3.0], [[0.0, 1.0], [0.0, 1.0]],
                        [0.1, 0.1], [0.0, 0.0])}}}


def test_collect_router_losses_sums_layers_and_averages_partitions():
  tree = _sown_tree()
  got = losses.collect_router_losses(tree)
  assert float(got["load_balance_loss"]) == pytest.approx(2.0 + 2.0)
  assert float(got["router_z_loss"]) == pytest.approx(0.5 + 2.0)
  # Same without the outer collection key; zeros for a dense model.
  inner = losses.collect_router_losses(tree["intermediates"])
  assert float(inner["load_balance_loss"]) == pytest.approx(4.0)
  dense = losses.collect_router_losses({})
  assert float(dense["load_balance_loss"]) == 0.0
  assert float(dense["router_z_loss"]) == 0.0


def _with_captures(tree):
  """`_sown_tree` plus outputs as `capture_intermediates` records them."""
  big = jnp.array([100.0, 100.0])
  captured = routing.RouterOutput(
      jnp.zeros((2, 3, 1), jnp.int32), jnp.ones((2, 3, 1)),
      jnp.ones((2, 3, 2)), jnp.ones((2, 3, 2)), big, big)
  moe = tree["intermediates"]["decoder"]["layers_1"]["moe"]
  moe["router"] = {"__call__": (captured,)}
  moe["__call__"] = ({"load_balance_loss": big, "router_entropy": big},)
  return tree


def test_captured_outputs_are_not_collected():
  plain, captured = _sown_tree(), _with_captures(_sown_tree())
  for tree in (captured, captured["intermediates"]):
    got = losses.collect_router_losses(tree)
    want = losses.collect_router_losses(plain)
    assert {k: float(v) for k, v in got.items()} == {
        k: float(v) for k, v in want.items()}
  got = losses.router_metrics(captured)
  want = losses.router_metrics(plain)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_total_loss_weights_router_losses():
  logits, targets = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([2])
  ce, _ = _ce([1.0, 2.0, 3.0], 2)
  loss, aux = losses.total_loss(logits, targets, None, _sown_tree())
  assert float(loss) == pytest.approx(ce + 0.01 * 4.0 + 0.001 * 2.5, rel=1e-6)
  assert float(aux["cross_entropy"]) == pytest.approx(ce, rel=1e-6)
  loss, _ = losses.total_loss(logits, targets, jnp.array([2.0]), _sown_tree(),
                              load_balance_factor=0.5,
                              router_z_loss_factor=0.0)
  assert float(loss) == pytest.approx(ce + 0.5 * 4.0, rel=1e-6)


def test_router_metrics_hand_tree():
  metrics = losses.router_metrics(_sown_tree())
  layer1 = "decoder/layers_1/moe"
  np.testing.assert_allclose(metrics[f"{layer1}/expert_usage_E"], [0.75, 0.25])
  assert float(metrics[f"{layer1}/dropped_fraction"]) == pytest.approx(0.1)
  assert float(metrics[f"{layer1}/router_entropy"]) == pytest.approx(0.5)
  assert float(metrics["dropped_fraction"]) == pytest.approx(0.1)
  assert float(metrics["router_entropy"]) == pytest.approx(0.25)
  assert losses.router_metrics({}) == {}


def test_losses_from_a_real_model():
  config = decoder_config.DecoderConfig(
      vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_layers=2,
      num_experts=4, expert_d_ff=8, num_partitions=2, dispatch="sort_gather")
  model = transformer.TieredDecoder(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 2, 8), 0, 32)

  @jax.jit
  def run(tokens):
    logits, variables = model.init_with_output(
        jax.random.PRNGKey(1), tokens, mutable=["params", "intermediates"])
    return (losses.total_loss(logits, tokens, None, variables)[1],
            losses.router_metrics(variables))

  with jax.threefry_partitionable(False):  # Faster to compile on CPU.
    aux, metrics = run(tokens)
  # Two MoE layers, each with a balance loss near 1 (1 = perfect balance).
  assert 1.5 < float(aux["load_balance_loss"]) < 2.0 * 4
  assert float(aux["router_z_loss"]) > 0.0
  assert np.isfinite(float(aux["loss"]))
  for i in (0, 1):
    usage = metrics[f"decoder/layers_{i}/moe/expert_usage_E"]
    np.testing.assert_allclose(usage.sum(), 1.0, rtol=1e-5)


def test_capture_intermediates_leaves_router_losses_unchanged():
  config = decoder_config.DecoderConfig(
      vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_layers=2,
      num_experts=4, expert_d_ff=8, num_partitions=2, sharing="attention",
      dispatch="sort_gather")
  model = transformer.TieredDecoder(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 2, 8), 0, 32)

  @jax.jit
  def run(tokens):
    variables = model.init(jax.random.PRNGKey(1), tokens)
    out = []
    for capture in (False, True):  # True records every module's output.
      _, state = model.apply(variables, tokens, mutable=["intermediates"],
                             capture_intermediates=capture)
      out.append((state, losses.collect_router_losses(state),
                  losses.router_metrics(state)))
    return out

  with jax.threefry_partitionable(False):  # Faster to compile on CPU.
    (_, plain, plain_metrics), (state, captured, captured_metrics) = run(
        tokens)
  # The captured RouterOutputs carry the loss values under the same names.
  router = state["intermediates"]["decoder"]["layers_0"]["moe"]["router"]
  assert isinstance(router["__call__"][0], routing.RouterOutput)
  assert float(plain["load_balance_loss"]) > 0.0
  for name in ("load_balance_loss", "router_z_loss"):
    assert float(captured[name]) == float(plain[name]), name
  assert set(captured_metrics) == set(plain_metrics)
  for name, value in plain_metrics.items():
    np.testing.assert_array_equal(captured_metrics[name], value, name)
