"""Tests for tiered_routing.model.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import layers


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  # XLA:CPU compiles partitionable threefry for multi-dimensional shapes ~6x
  # slower; these single-device tests do not need sharding-invariant draws.
  with jax.threefry_partitionable(False):
    yield


def _names(variables):
  """{path: logical axis names} of boxed params."""
  flat = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return {"/".join(k.key for k in path): leaf.names for path, leaf in flat}


def test_rmsnorm_matches_formula_and_keeps_fp32_params():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8)) * 3.0
  norm = layers.RMSNorm(dtype=jnp.bfloat16)
  variables = norm.init(jax.random.PRNGKey(1), x)
  scale = jnp.arange(1.0, 9.0)
  variables = jax.tree.map(lambda _: scale, nn.unbox(variables))
  y = norm.apply(variables, x)
  want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * scale
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2)
  boxed = norm.init(jax.random.PRNGKey(1), x)
  assert _names(boxed) == {"scale": ("embed",)}
  assert nn.unbox(boxed)["params"]["scale"].dtype == jnp.float32


def test_embed_lookup_attend_and_axes():
  embed = layers.Embed(num_embeddings=10, features=4)
  ids = jnp.array([[1, 7, 7]])
  variables = embed.init(jax.random.PRNGKey(0), ids)
  assert _names(variables) == {"embedding": ("vocab", "embed")}
  table = nn.unbox(variables)["params"]["embedding"]
  x = embed.apply(variables, ids)
  np.testing.assert_array_equal(x[0], table[jnp.array([1, 7, 7])])
  logits = embed.apply(variables, x, method=layers.Embed.attend)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 3, 10)
  np.testing.assert_allclose(logits[0], x[0] @ table.T / 2.0, rtol=1e-5)


def test_rotary_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  def score(m, n):
    qm = layers.apply_rotary(q, jnp.array([[m]]))
    kn = layers.apply_rotary(k, jnp.array([[n]]))
    return float(jnp.sum(qm * kn))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
  np.testing.assert_allclose(layers.apply_rotary(q, jnp.zeros((1, 1))), q)
  with pytest.raises(ValueError, match="even head_dim, got 7"):
    layers.apply_rotary(jnp.ones((1, 1, 1, 7)), jnp.zeros((1, 1)))


def test_causal_segment_mask_hand_built():
  seg = jnp.array([[1, 1, 2, 0]])
  got = layers.causal_segment_mask(4, seg, 1)[0, 0]
  want = np.array([[1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 0, 1, 0],
                   [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(got, want)
  assert layers.causal_segment_mask(3, None, 2).shape == (2, 1, 3, 3)


def _attention():
  return layers.MultiHeadAttention(num_heads=2, head_dim=4)


def test_attention_is_causal():
  attn = _attention()
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 8))
  variables = attn.init(jax.random.PRNGKey(1), x)
  # jac[i, :, j, :] = d out_i / d x_j.
  jac = jax.jit(jax.jacrev(lambda x: attn.apply(variables, x)[0]))(x)[:, :, 0]
  norms = np.asarray(jnp.abs(jac).sum(axis=(1, 3)))
  assert np.all(np.triu(norms, k=1) == 0.0)
  assert np.all(norms[np.tril_indices(6)] > 0.0)
  assert _names(variables) == {
      "query": ("embed", "heads", "kv"), "key": ("embed", "heads", "kv"),
      "value": ("embed", "heads", "kv"), "out": ("heads", "kv", "embed")}


def test_packed_segments_equal_separate_sequences():
  attn = _attention()
  a = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))
  b = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 8))
  variables = attn.init(jax.random.PRNGKey(2), a)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 1, 8))], axis=1)
  apply = jax.jit(lambda x, seg, pos: attn.apply(
      variables, x, segment_ids_BxL=seg, positions_BxL=pos))
  out = apply(packed, jnp.array([[1, 1, 1, 2, 2, 0]]),
              jnp.array([[0, 1, 2, 0, 1, 0]]))
  np.testing.assert_allclose(out[:, :3], apply(a, None, None), atol=1e-5)
  np.testing.assert_allclose(out[:, 3:5], apply(b, None, None), atol=1e-5)


def test_mlp_gated_and_plain_match_formula():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  for gated in (True, False):
    mlp = layers.Mlp(d_ff=6, gated=gated, activation="relu")
    variables = mlp.init(jax.random.PRNGKey(1), x)
    p = nn.unbox(variables)["params"]
    h = jax.nn.relu(x @ p["wi"])
    if gated:
      h = h * (x @ p["wi_gate"])
    np.testing.assert_allclose(mlp.apply(variables, x), h @ p["wo"],
                               rtol=1e-5, atol=1e-6)
    names = _names(variables)
    assert names["wi"] == ("embed", "mlp") and names["wo"] == ("mlp", "embed")
    assert ("wi_gate" in names) == gated


def test_unknown_activation_is_rejected():
  with pytest.raises(ValueError, match="'swish'"):
    layers.get_activation("swish")
