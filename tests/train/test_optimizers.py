"""Tests for tiered_routing.optimizers."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.train import optimizers


def _params():
  """Boxed toy parameters: two partition-private, one shared."""
  return {
      "private": {
          "kernel": nn.LogicallyPartitioned(
              jnp.ones((2, 3, 4)), ("partition", "embed", "mlp")
          ),
          "scale": nn.LogicallyPartitioned(
              jnp.ones((2, 3)), ("partition", "embed")
          ),
      },
      "shared": {
          "kernel": nn.LogicallyPartitioned(jnp.ones((3, 4)), ("embed", "mlp"))
      },
  }


def test_cosine_schedule_golden_values():
  config = optimizers.OptimizerConfig(
      learning_rate=1.0,
      schedule="cosine",
      warmup_steps=10,
      final_learning_rate_fraction=0.1,
  )
  schedule = optimizers.make_schedule(config, total_steps=110)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
      [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1],
      rtol=1e-6,
      atol=1e-7,
  )


def test_rsqrt_and_constant_schedules():
  rsqrt = optimizers.make_schedule(
      optimizers.OptimizerConfig(
          learning_rate=2.0, schedule="rsqrt", warmup_steps=100
      ),
      1000,
  )
  np.testing.assert_allclose(
      [rsqrt(50), rsqrt(100), rsqrt(400)], [1.0, 2.0, 1.0], rtol=1e-6
  )
  constant = optimizers.make_schedule(
      optimizers.OptimizerConfig(
          learning_rate=2.0, schedule="constant", warmup_steps=0
      ),
      10,
  )
  np.testing.assert_allclose([constant(0), constant(9)], [2.0, 2.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "sgd"}, "name='sgd'"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"warmup_steps": 10, "decay_steps": 5}, "decay_steps=5"),
        ({"b2": 1.0}, "b2=1.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optimizers.OptimizerConfig(**kwargs)


def test_partitioned_mask_reads_logical_axes():
  mask = optimizers.partitioned_mask(_params())
  assert mask == {
      "private": {"kernel": True, "scale": True},
      "shared": {"kernel": False},
  }


def _partition0_updates(tx, params):
  """Partition 0's second update when partition 1's second gradient is
  normal vs. 1e4 times larger (the first gradients are equal)."""
  g = jax.tree.map(
      lambda p: jnp.linspace(0.1, 0.9, p.size).reshape(p.shape), params
  )
  big = dict(
      g, private=jax.tree.map(lambda x: x.at[1].multiply(1e4), g["private"])
  )

  @jax.jit
  def two_updates(second):
    state = tx.init(params)
    _, state = tx.update(g, state, params)
    updates, _ = tx.update(second, state, params)
    return jax.tree.map(lambda u: u[0], updates["private"])

  return [two_updates(g), two_updates(big)]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_partitions_are_optimized_independently(name):
  """Partition 0's update ignores partition 1's gradient; the same optimizer
  without the partition mask (the control) does not."""
  boxed = _params()
  params = nn.unbox(boxed)
  config = optimizers.OptimizerConfig(
      name=name,
      learning_rate=0.1,
      warmup_steps=0,
      schedule="constant",
      clip_norm=1.0,
      min_dim_size_to_factor=2,
  )
  tx = optimizers.make_optimizer(config, 10, optimizers.partitioned_mask(boxed))
  normal, big = _partition0_updates(tx, params)
  for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(big)):
    np.testing.assert_array_equal(a, b)
  control = optimizers.make_optimizer(config, 10)
  normal, big = _partition0_updates(control, params)
  assert not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(big))
  )


def test_weight_decay_skips_norm_scales():
  params = {"kernel": jnp.ones((3,)), "scale": jnp.ones((3,))}
  config = optimizers.OptimizerConfig(
      learning_rate=0.1,
      warmup_steps=0,
      schedule="constant",
      weight_decay=0.5,
      clip_norm=0.0,
  )
  tx = optimizers.make_optimizer(config, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.05 * np.ones(3))
  np.testing.assert_array_equal(updates["scale"], np.zeros(3))
