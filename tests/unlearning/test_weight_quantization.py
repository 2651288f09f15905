"""Round-to-nearest weight quantization: golden values, bounds, the tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import forward
from tiered_routing.unlearning import weight_quantization as wq


def test_golden_values_per_output_column():
  w = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
  # Column 0: scale 1/127, 0.5 -> 63.5 -> 64 (half to even); column 1:
  # scale 4/127, -2 -> -63.5 -> -64.
  want8 = np.array([[1.0, -64 * 4 / 127], [64 / 127, 4.0]], np.float32)
  np.testing.assert_allclose(wq.quantize_array(w, 8, (-2,)), want8, rtol=1e-6)
  # int4: 7 levels; 0.5 * 7 = 3.5 -> 4, -2 * 7 / 4 = -3.5 -> -4.
  want4 = np.array([[1.0, -16 / 7], [4 / 7, 4.0]], np.float32)
  np.testing.assert_allclose(wq.quantize_array(w, 4, (-2,)), want4, rtol=1e-6)


@pytest.mark.parametrize("bits", wq.BITS)
def test_error_at_most_half_a_step_and_idempotent(bits):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 8)) * jnp.arange(
      1, 9, dtype=jnp.float32
  )
  q = wq.quantize_array(w, bits, (-2,))
  step = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / (2 ** (bits - 1) - 1)
  assert bool(jnp.all(jnp.abs(q - w) <= step / 2 * (1 + 1e-5)))
  np.testing.assert_allclose(wq.quantize_array(q, bits, (-2,)), q, atol=1e-6)
  levels = np.unique(np.round(np.asarray(q / step), 3))
  assert len(levels) <= 2 ** bits - 1


def test_zero_channel_stays_zero_and_channels_are_independent():
  # A [D, H, Q] query kernel: one scale per (h, q); one huge channel must
  # not coarsen the others, and an all-zero channel stays exactly zero.
  w = np.full((4, 2, 3), 0.01, np.float32)
  w[:, 0, 0] = 100.0
  w[:, 1, 2] = 0.0
  q = np.asarray(wq.quantize_array(w, 4, wq.contracted_axes("query", 3)))
  np.testing.assert_allclose(q, w, rtol=1e-6)
  assert np.all(q[:, 1, 2] == 0.0)


def test_round_trip_tree_keeps_vectors_and_runs(tiny_model):
  m = tiny_model("attention")
  out8 = wq.round_trip(m.params, 8)
  assert jax.tree.structure(out8) == jax.tree.structure(m.params)
  changed = []
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(m.params), jax.tree.leaves(out8)
  ):
    if np.ndim(a) < 2:
      np.testing.assert_array_equal(a, b)
    else:
      changed.append(not np.array_equal(a, b))
      assert np.asarray(b).shape == np.asarray(a).shape, path
  assert any(changed)
  batch = {"decoder_input_tokens": m.tokens}
  logits = jax.jit(
      lambda p: forward.forward(m.model, p, batch).logits_PxBxLxV
  )  # One program for the three parameter sets.
  ref = logits(m.params)
  err8 = float(jnp.max(jnp.abs(logits(out8) - ref)))
  err4 = float(jnp.max(jnp.abs(logits(wq.round_trip(m.params, 4)) - ref)))
  assert 0 < err8 < err4


def test_bad_bits_named():
  with pytest.raises(ValueError, match=r"bits=3.*allowed: \(8, 4\)"):
    wq.round_trip({"w": np.ones((2, 2))}, 3)
  with pytest.raises(ValueError, match="'out' has 2 axes"):
    wq.contracted_axes("out", 2)
