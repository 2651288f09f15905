"""Tests for tiered_routing.model.moe (MoeFeedForward and grouping)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import moe


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  # XLA:CPU compiles partitionable threefry for multi-dimensional shapes ~6x
  # slower; these single-device tests do not need sharding-invariant draws.
  with jax.threefry_partitionable(False):
    yield

D, E, F = 8, 4, 6


def _moe(**kwargs):
  defaults = dict(num_experts=E, expert_d_ff=F, top_k=2, dispatch="reference",
                  vocab_size=32)
  return moe.MoeFeedForward(**{**defaults, **kwargs})


def _x(g=2, s=5, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (g, s, D))


@pytest.fixture(scope="module")
def topk():
  """A top-2 MoE with a shared dense expert, its variables and outputs."""
  layer = _moe(shared_expert_d_ff=3)
  x = _x()
  variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
  apply = jax.jit(lambda v, x, mask: layer.apply(
      v, x, expert_mask_GxSxE=mask, mutable=["intermediates"]))
  return layer, variables, x, apply


def test_group_shape():
  assert moe.group_shape(4, 8, 16) == (2, 16)   # two whole rows per group
  assert moe.group_shape(3, 8, 16) == (3, 8)    # 2 rows do not divide 3
  assert moe.group_shape(2, 8, 4) == (4, 4)     # rows split in halves
  assert moe.group_shape(2, 8, 3) == (8, 2)     # largest divisor of 8 <= 3
  with pytest.raises(ValueError, match="group_size=0"):
    moe.group_shape(2, 8, 0)


def test_routing_segment_ids_are_unique_per_sequence():
  # Two packed rows of length 4 grouped together; padding stays 0.
  seg = jnp.array([[1, 1, 2, 0, 1, 2, 2, 2]])
  np.testing.assert_array_equal(moe.routing_segment_ids(seg, 4),
                                [[1, 1, 2, 0, 4, 5, 5, 5]])


def test_param_paths_and_logical_axes(topk):
  _, variables, _, _ = topk
  flat = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  names = {"/".join(k.key for k in p): leaf.names for p, leaf in flat}
  assert names["expert/wi"] == ("expert", "embed", "expert_mlp")
  assert names["expert/wi_gate"] == ("expert", "embed", "expert_mlp")
  assert names["expert/wo"] == ("expert", "expert_mlp", "embed")
  assert names["router/kernel"] == ("embed", "unmodeled")
  for path, axes in names.items():
    assert ("expert" in path.split("/")) == ("expert" in axes), path
  shapes = jax.tree.map(jnp.shape, nn.unbox(variables))["params"]["expert"]
  assert shapes == {"wi": (E, D, F), "wi_gate": (E, D, F), "wo": (E, F, D)}


def _hand_moe(params, x_SxD):
  """Top-2 softmax routing and gated-GELU experts, written out per token."""
  probs = jax.nn.softmax(x_SxD @ params["router"]["kernel"])
  w, idx = jax.lax.top_k(probs, 2)
  w = w / w.sum(-1, keepdims=True)
  ex, sh = params["expert"], params["shared_mlp"]
  y = []
  for t in range(x_SxD.shape[0]):
    x = x_SxD[t]
    out = jax.nn.gelu(x @ sh["wi"]) * (x @ sh["wi_gate"]) @ sh["wo"]
    for k in range(2):
      wi, gate, wo = (ex[n][idx[t, k]] for n in ("wi", "wi_gate", "wo"))
      out = out + w[t, k] * ((jax.nn.gelu(x @ wi) * (x @ gate)) @ wo)
    y.append(out)
  return jnp.stack(y)


def test_matches_hand_computation(topk):
  _, variables, x, apply = topk
  y, _ = apply(variables, x, None)
  params = nn.unbox(variables)["params"]
  want = jax.jit(jax.vmap(_hand_moe, in_axes=(None, 0)))(params, x)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)


def test_sown_metrics(topk):
  _, variables, x, apply = topk
  _, state = apply(variables, x, None)
  sown = state["intermediates"]
  assert set(sown) == set(moe.SOWN_NAMES)
  usage = sown["expert_usage_E"][0]
  assert usage.shape == (E,)
  np.testing.assert_allclose(usage.sum(), 1.0, rtol=1e-6)
  assert 0.0 < float(sown["router_entropy"][0]) <= 1.0
  assert float(sown["dropped_fraction"][0]) == 0.0  # reference is dropless
  # Only expert 2 allowed: usage is one-hot, entropy 0, nothing else routed.
  only2 = jnp.zeros(x.shape[:2] + (E,), bool).at[..., 2].set(True)
  _, state = apply(variables, x, only2)
  np.testing.assert_allclose(state["intermediates"]["expert_usage_E"][0],
                             [0, 0, 1, 0])
  assert float(state["intermediates"]["router_entropy"][0]) == 0.0


def test_masked_expert_gets_zero_gradient(topk):
  _, variables, x, apply = topk
  mask = jnp.ones(x.shape[:2] + (E,), bool).at[..., 1].set(False)
  grads = jax.jit(jax.grad(
      lambda v: jnp.sum(apply(v, x, mask)[0] ** 2)))(variables)
  grads = nn.unbox(grads)["params"]
  for name, g in grads["expert"].items():
    assert float(jnp.abs(g[1]).max()) == 0.0, name
    assert float(jnp.abs(g[0]).max()) > 0.0, name
  assert float(jnp.abs(grads["router"]["kernel"][:, 1]).max()) == 0.0


def test_groups_are_independent(topk):
  _, variables, x, apply = topk
  y, _ = apply(variables, x, None)
  y0, _ = apply(variables, x[:1], None)
  np.testing.assert_allclose(y[:1], y0, rtol=1e-5, atol=1e-6)


def test_dispatch_impls_agree_with_reference_when_nothing_drops():
  x = _x(g=2, s=6, seed=3)
  impls = ("reference", "auto", "einsum")
  variables = jax.jit(_moe().init)(jax.random.PRNGKey(4), x)
  outs = jax.jit(lambda v, x: [
      _moe(dispatch=impl, capacity_factor=4.0).apply(v, x) for impl in impls
  ])(variables, x)
  for impl, got in zip(impls[1:], outs[1:]):
    np.testing.assert_allclose(got, outs[0], rtol=1e-4, atol=1e-5, err_msg=impl)


def test_other_routers_run_in_bfloat16():
  routers = ("expert_choice", "hash", "sequence_gate")
  x = _x()
  ids = jnp.arange(10).reshape(2, 5)
  seg = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])

  def init_all(x):
    return {router: _moe(router=router, top_k=1, dispatch="sort_gather",
                         dtype=jnp.bfloat16).init_with_output(
                             jax.random.PRNGKey(0), x, token_ids_GxS=ids,
                             segment_ids_GxS=seg,
                             mutable=["params", "intermediates"])
            for router in routers}

  for router, (y, variables) in jax.jit(init_all)(x).items():
    assert y.shape == x.shape and y.dtype == jnp.bfloat16, router
    assert all(p.dtype == jnp.float32
               for p in jax.tree.leaves(nn.unbox(variables["params"])))
    assert np.isfinite(np.asarray(y, np.float32)).all(), router
    sown = variables["intermediates"]
    if router == "expert_choice":  # Capacity equals the router's: no drops.
      assert float(sown["dropped_fraction"][0]) == 0.0
    # Padding (segment 0) is routed nowhere, so its MoE output is exactly 0.
    if router != "hash":
      np.testing.assert_array_equal(np.asarray(y[0, 4], np.float32), 0.0)


def test_rejects_bad_inputs():
  layer = _moe()
  with pytest.raises(ValueError, match="x_GxSxD"):
    layer.init(jax.random.PRNGKey(0), jnp.ones((5, D)))
  with pytest.raises(ValueError, match="num_experts=4"):
    layer.init(jax.random.PRNGKey(0), _x(),
               expert_mask_GxSxE=jnp.ones((2, 5, 3), bool))
  with pytest.raises(ValueError, match="'bogus'"):
    _moe(router="bogus").init(jax.random.PRNGKey(0), _x())
