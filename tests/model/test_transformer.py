"""Tests for tiered_routing.model.transformer (DecoderConfig, TieredDecoder)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import forward
from tiered_routing.model import layers
from tiered_routing.model import losses
from tiered_routing.model import transformer
from tiered_routing.tier1 import layout

P, B, L, V = 2, 2, 8, 32
SEGMENTS = jnp.array([1, 1, 1, 2, 2, 2, 2, 0])
POSITIONS = jnp.array([0, 1, 2, 0, 1, 2, 3, 0])


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  # XLA:CPU compiles partitionable threefry for multi-dimensional shapes ~6x
  # slower; these single-device tests do not need sharding-invariant draws.
  with jax.threefry_partitionable(False):
    yield


def _config(**overrides):
  base = dict(vocab_size=V, d_model=16, num_heads=2, head_dim=8, num_layers=2,
              d_ff=32, num_experts=4, expert_d_ff=8, moe_every=2,
              num_partitions=P, group_size=16, dispatch="sort_gather",
              capacity_factor=4.0)  # Large enough that no slot is dropped.
  return decoder_config.DecoderConfig(**{**base, **overrides})


def _tokens(seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (P, B, L), 0, V)


def _random_variables(model, seed=0):
  """Variables of `model` drawn with numpy: compiling `init` costs seconds.

  The model's own initializers are exercised by the shape tests below and by
  test_moe.py / test_layers.py.
  """
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   _tokens()))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _model_and_variables(sharing: str):
  """A tiny model and random variables, shared by several tests."""
  model = transformer.TieredDecoder(_config(sharing=sharing))
  return model, _random_variables(model)


def _boxed_params(config):
  model = transformer.TieredDecoder(config)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), _tokens())["params"]


def _axes(config) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(
      _boxed_params(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return {"/".join(k.key for k in path): leaf.names for path, leaf in flat}


@pytest.mark.parametrize("bad, match", [
    (dict(sharing="some"), "sharing='some'"),
    (dict(router="topk"), "router='topk'"),
    (dict(dispatch="fast"), "dispatch='fast'"),
    (dict(dtype="fp8"), "dtype='fp8'"),
    (dict(head_dim=7), "head_dim=7"),
    (dict(top_k=5), "top_k=5"),
    (dict(d_ff=0), "d_ff=0"),
    (dict(num_partitions=0), "num_partitions=0"),
    (dict(expert_d_ff=0), "expert_d_ff=0"),
    (dict(dropout_rate=1.0), "dropout_rate=1.0"),
])
def test_config_rejects_bad_values(bad, match):
  with pytest.raises(ValueError, match=match):
    _config(**bad)


def test_dense_model_needs_no_expert_sizes():
  config = _config(num_experts=0, expert_d_ff=0)
  assert not any(config.is_moe_layer(i) for i in range(config.num_layers))
  assert [_config(moe_every=m).is_moe_layer(1) for m in (1, 2)] == [True, True]
  assert not _config(moe_every=2).is_moe_layer(0)


@pytest.mark.parametrize("sharing", ["none", "attention", "all"])
def test_output_shapes(sharing):
  config = _config(sharing=sharing, dtype="bfloat16")
  model = transformer.TieredDecoder(config)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), _tokens())
  logits = jax.eval_shape(model.apply, variables, _tokens())
  assert logits.shape == (P, B, L, V) and logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nn.unbox(variables["params"])))


def test_partition_axis_placement():
  for name, axes in _axes(_config(sharing="none")).items():
    assert axes[0] == "partition", name
  for name, axes in _axes(_config(sharing="attention")).items():
    private = "/moe/" in name or "/mlp/" in name
    assert (axes[0] == "partition") == private, name
  for name, axes in _axes(_config(sharing="all")).items():
    assert "partition" not in axes, name
  experts = nn.unbox(_boxed_params(_config(sharing="all")))
  assert experts["decoder"]["layers_1"]["moe"]["expert"]["wi"].shape[0] == P * 4


@pytest.mark.parametrize("sharing, router", [
    ("none", "token_topk"), ("attention", "sequence_gate"),
    ("all", "expert_choice")])
def test_expert_in_path_iff_expert_axis(sharing, router):
  config = _config(sharing=sharing, router=router, shared_expert_d_ff=8,
                   tie_embeddings=False)
  axes = _axes(config)
  experts = [n for n in axes if "expert" in n.split("/")]
  assert sorted(n.split("/")[-1] for n in experts) == ["wi", "wi_gate", "wo"]
  for name, names in axes.items():
    assert ("expert" in name) == ("expert" in names), (name, names)
    if "expert" in names:
      assert names[-3:] in (("expert", "embed", "expert_mlp"),
                            ("expert", "expert_mlp", "embed")), name


def _embedding_jacobian(model, variables):
  """d(projected logits at i) / d(embedding output at j): [L, L] norms.

  A perturbation `delta_LxD` is added to the embedding output of every row
  (via method interception), so the Jacobian w.r.t. it measures how position
  j's input reaches position i's logits.
  """
  tokens = _tokens(1)
  seg = jnp.broadcast_to(SEGMENTS, tokens.shape)
  pos = jnp.broadcast_to(POSITIONS, tokens.shape)
  proj = jax.random.normal(jax.random.PRNGKey(2), (P, B, L, V))

  def logits_at(delta_LxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (isinstance(context.module, layers.Embed)
          and context.method_name == "__call__"):
        out = out + delta_LxD
      return out
    with nn.intercept_methods(add_delta):
      logits = model.apply(variables, tokens, segment_ids_PxBxL=seg,
                           positions_PxBxL=pos)
    return jnp.sum(logits * proj, axis=(0, 1, 3))

  jac = jax.jacrev(logits_at)(jnp.zeros((L, model.config.d_model)))
  return jnp.abs(jac).sum(-1)


def test_causal_and_segment_isolated():
  # Sharing 'attention' runs shared attention and partition-private MoE /
  # dense FFNs on regrouped rows, so it exercises every path of the model.
  model, variables = _model_and_variables("attention")
  norms = np.asarray(jax.jit(functools.partial(_embedding_jacobian, model))(
      variables))
  i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
  seg = np.asarray(SEGMENTS)
  visible = (j <= i) & (seg[i] == seg[j])
  assert np.all(norms[~visible] == 0.0)
  assert np.all(norms[visible] > 0.0)


@pytest.fixture(scope="module", params=["none", "attention"])
def partition0_grads(request):
  """Gradients of partition 0's loss, with and without masking expert 1."""
  model, variables = _model_and_variables(request.param)
  tokens = _tokens(3)

  def loss(params, mask):
    logits, state = model.apply({"params": params}, tokens,
                                expert_mask_PxE=mask, mutable="intermediates")
    ce, _, _ = losses.cross_entropy_loss(logits[0, :, :-1], tokens[0, :, 1:])
    # Partition 0's own router losses (entry 0 of the partition axis) too.
    router = [v[0] for path, v in _flat(state).items()
              if path.endswith(("load_balance_loss/0", "router_z_loss/0"))]
    assert len(router) == 2
    return ce + sum(router)

  grad = jax.jit(jax.grad(loss))
  all_on = jnp.ones((P, 4), bool)
  masked = all_on.at[0, 1].set(False)
  params = variables["params"]
  return (_axes(model.config), nn.unbox(grad(params, all_on)),
          nn.unbox(grad(params, masked)), request.param)


def _flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          leaf for path, leaf in flat}


def test_no_gradient_crosses_partitions(partition0_grads):
  axes, grads, _, sharing = partition0_grads
  for name, g in _flat(grads).items():
    if axes[name][0] == "partition":
      assert float(jnp.abs(g[1]).max()) == 0.0, name
      assert float(jnp.abs(g[0]).max()) > 0.0, name
    else:
      assert sharing == "attention" and float(jnp.abs(g).max()) > 0.0, name


def test_masked_expert_gets_zero_gradient(partition0_grads):
  _, _, grads, _ = partition0_grads
  for name, g in _flat(grads).items():
    if "/expert/" in name:
      assert float(jnp.abs(g[0, 1]).max()) == 0.0, name
      assert float(jnp.abs(g[0, 0]).max()) > 0.0, name
    if name.endswith("router/kernel"):
      assert float(jnp.abs(g[0, :, 1]).max()) == 0.0, name


# Per-layer masks: 4 layers with moe_every=2 make layers 1 and 3 the MoE
# layers m = 0 and m = 1. Expert E_OFF is removed for partition 0 in MoE layer
# 1 only; m != p, so a vmap slicing the wrong mask axis would mask partition 1.
E_OFF = 1


def _per_layer_mask(config):
  mask = np.ones((2, P, config.experts_per_layer), bool)
  mask[1, 0, E_OFF] = False
  return jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _per_layer_run(sharing: str):
  """Routing and partition-0 gradients under `_per_layer_mask`."""
  model = transformer.TieredDecoder(_config(sharing=sharing, num_layers=4))
  variables = _random_variables(model)
  tokens, mask = _tokens(4), _per_layer_mask(model.config)

  def loss(params):
    out = forward.forward(
        model, params, {"decoder_input_tokens": tokens},
        expert_mask_MxPxE=mask, capture_routing=True)
    logits, route, inter = out.logits_PxBxLxV, out.routing, out.intermediates
    ce, _, _ = losses.cross_entropy_loss(logits[0, :, :-1], tokens[0, :, 1:])
    if sharing != "all":  # Partition 0's own router losses.
      ce += sum(v[0] for path, v in _flat(inter).items()
                if path.endswith(("load_balance_loss/0", "router_z_loss/0")))
    return ce, (logits, route)

  def run(params):
    (_, (logits, route)), grads = jax.value_and_grad(loss, has_aux=True)(
        params)
    # The same mask in both layers, given in either form.
    both = jnp.broadcast_to(mask[1], mask.shape)
    same = (model.apply({"params": params}, tokens, expert_mask_PxE=mask[1]),
            model.apply({"params": params}, tokens, expert_mask_MxPxE=both))
    return logits, route, grads, same

  logits, route, grads, same = jax.jit(run)(variables["params"])
  return model, logits, route, nn.unbox(grads), same


@pytest.mark.parametrize("sharing", ["none", "attention", "all"])
def test_per_layer_mask_routing(sharing):
  model, logits, route, _, (via_pxe, via_mxpxe) = _per_layer_run(sharing)
  assert route.layer_names == ("decoder/layers_1/moe", "decoder/layers_3/moe")
  pid = np.asarray(layout.token_partition_ids((P, B, L)))
  used = np.asarray(route.combine_weights_MxTxK) > 0
  uses_e = (used & (np.asarray(route.expert_index_MxTxK) == E_OFF)).any(-1)
  assert not uses_e[1, pid == 0].any()  # Masked: MoE layer 1, partition 0.
  assert uses_e[0, pid == 0].any()      # Same expert index, other layer.
  assert uses_e[1, pid == 1].any()      # Same layer, other partition.
  # Only partition 0's MoE layer 1 lost an expert: slots are still all used.
  assert used.sum() == used.size
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(via_pxe, via_mxpxe)


@pytest.mark.parametrize("sharing", ["none", "attention", "all"])
def test_per_layer_mask_zero_gradient_in_that_layer_only(sharing):
  _, _, _, grads, _ = _per_layer_run(sharing)
  # Expert weights of partition 0 ([P, E, ...]; [P * E, ...] for 'all').
  p0 = (lambda g: g[0]) if sharing != "all" else (lambda g: g)
  moe = grads["decoder"]
  for name in ("wi", "wi_gate", "wo"):
    masked = p0(moe["layers_3"]["moe"]["expert"][name])
    other_layer = p0(moe["layers_1"]["moe"]["expert"][name])
    assert float(jnp.abs(masked[E_OFF]).max()) == 0.0, name
    assert float(jnp.abs(masked[E_OFF - 1]).max()) > 0.0, name
    assert float(jnp.abs(other_layer[E_OFF]).max()) > 0.0, name
  kernel = lambda i: p0(moe[f"layers_{i}"]["moe"]["router"]["kernel"])
  assert float(jnp.abs(kernel(3)[:, E_OFF]).max()) == 0.0
  assert float(jnp.abs(kernel(1)[:, E_OFF]).max()) > 0.0


def test_rejects_bad_input_shapes():
  model = transformer.TieredDecoder(_config(sharing="all"))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"num_partitions = 2"):
    model.init(key, jnp.zeros((3, B, L), jnp.int32))
  with pytest.raises(ValueError, match=r"expected \(2, 8\)"):
    model.init(key, _tokens(), expert_mask_PxE=jnp.ones((P, 4), bool))
  # One MoE layer (layer 1): the per-layer mask is [1, P, P * E].
  with pytest.raises(ValueError, match=r"expected \(1, 2, 8\).*\(1,\)"):
    model.init(key, _tokens(), expert_mask_MxPxE=jnp.ones((2, P, 8), bool))
  with pytest.raises(ValueError, match="expert_mask_MxPxE"):
    model.init(key, _tokens(), expert_mask_PxE=jnp.ones((1, P, 8), bool))
  with pytest.raises(ValueError, match="at most one"):
    model.init(key, _tokens(), expert_mask_PxE=jnp.ones((P, 8), bool),
               expert_mask_MxPxE=jnp.ones((1, P, 8), bool))
  with pytest.raises(ValueError, match="segment_ids_PxBxL"):
    model.init(key, _tokens(), segment_ids_PxBxL=jnp.ones((P, B), jnp.int32))


def test_dropout_is_active_only_when_not_deterministic():
  config = _config(sharing="all", num_experts=0, expert_d_ff=0,
                   dropout_rate=0.5)
  model = transformer.TieredDecoder(config)
  variables = _random_variables(model)

  @jax.jit
  def run(variables, rng):
    return (model.apply(variables, _tokens(), deterministic=False,
                        rngs={"dropout": rng}),
            model.apply(variables, _tokens()))

  train_a, eval_a = run(variables, jax.random.PRNGKey(1))
  train_b, eval_b = run(variables, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert float(jnp.abs(train_a - train_b).max()) > 0.0
  assert float(jnp.abs(train_a - eval_a).max()) > 0.0
