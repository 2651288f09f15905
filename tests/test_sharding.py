"""Tests for tiered_routing.partitioning on 8 simulated CPU devices."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from tiered_routing import sharding
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer

MeshConfig = sharding.MeshConfig


def _logical(init, names):
  return nn.with_logical_partitioning(init, names)


class ToyExpertLayer(nn.Module):
  """Dense MLP + router + experts annotated with the project's logical axes."""
  num_experts: int = 4
  embed: int = 8
  mlp: int = 16

  @nn.compact
  def __call__(self, x_BxD):
    init = nn.initializers.normal(0.02)
    h_BxF = nn.Dense(self.mlp, kernel_init=_logical(init, ("embed", "mlp")),
                     bias_init=_logical(nn.initializers.zeros, ("mlp",)),
                     name="mlp")(x_BxD)
    logits_BxE = nn.Dense(
        self.num_experts, use_bias=False,
        kernel_init=_logical(init, ("embed", "unmodeled")),
        name="router")(x_BxD)
    w_ExDxF = self.param(
        "expert_wi", _logical(init, ("expert", "embed", "expert_mlp")),
        (self.num_experts, self.embed, self.mlp))
    expert_out_BxExF = jnp.einsum("bd,edf->bef", x_BxD, w_ExDxF)
    return h_BxF.sum() + logits_BxE.sum() + expert_out_BxExF.sum()


# A partition-private copy per tier-1 partition, as the model does it: vmap
# adds the leading 'partition' logical axis to every parameter.
PartitionedToy = nn.vmap(
    ToyExpertLayer, in_axes=0, out_axes=0,
    variable_axes={"params": 0}, split_rngs={"params": True},
    metadata_params={nn.PARTITION_NAME: "partition"})


# ---------------------------------------------------------------- MeshConfig


@pytest.mark.parametrize("config, expected", [
    (MeshConfig(), (1, 8, 1, 1)),
    (MeshConfig(partition=2, data=-1, model=2), (2, 2, 1, 2)),
    (MeshConfig(partition=-1, data=1, expert=2), (4, 1, 2, 1)),
    (MeshConfig(partition=2, data=2, expert=1, model=2), (2, 2, 1, 2)),
    (MeshConfig(data=1, model=-1), (1, 1, 1, 8)),
])
def test_axis_sizes(config, expected):
  assert config.axis_sizes(8) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=0), "MeshConfig.data=0"),
    (dict(model=-2), "MeshConfig.model=-2"),
    (dict(expert=2.0), "MeshConfig.expert=2.0"),
    (dict(partition=True), "MeshConfig.partition=True"),
    (dict(partition=-1), "at most one axis may be -1"),
])
def test_invalid_mesh_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MeshConfig(**kwargs)


def test_mesh_config_that_does_not_fit_devices():
  with pytest.raises(ValueError, match="3, does not divide .* 8"):
    MeshConfig(partition=3).axis_sizes(8)
  with pytest.raises(ValueError, match="4, must equal .* 8"):
    MeshConfig(partition=2, data=2).axis_sizes(8)


def test_make_mesh_covers_each_device_once():
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=-1, model=2))
  assert mesh.axis_names == ("partition", "data", "expert", "model")
  assert dict(mesh.shape) == {"partition": 2, "data": 2, "expert": 1,
                              "model": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_a_subset_of_devices():
  devices = jax.devices()[4:]
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=-1),
                                devices=devices)
  assert dict(mesh.shape)["expert"] == 4
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("names, expected", [
    (("partition", "batch", "length"), P("partition", "data", None)),
    (("batch", "length", "embed"), P(("partition", "data"), None, None)),
    (("partition", "expert", "embed", "expert_mlp"),
     P("partition", "expert", None, "model")),
    (("embed", "mlp"), P(None, "model")),
    (("embed", "heads", "kv"), P(None, "model", None)),
    (("vocab", "embed"), P("model", None)),
    (("embed", "unmodeled"), P(None, None)),
])
def test_rules(names, expected):
  mesh = sharding.make_mesh(MeshConfig(partition=2, expert=2, model=2))
  placement = sharding.logical_to_sharding(names, mesh)
  assert placement.spec == expected


def test_unknown_logical_name_is_an_error():
  mesh = sharding.make_mesh(MeshConfig())
  with pytest.raises(ValueError, match=r"\['hidden'\]"):
    sharding.logical_to_sharding({"w": ("embed", "hidden")}, mesh)


def test_logical_to_sharding_tree_with_shapes_falls_back(caplog):
  mesh = sharding.make_mesh(MeshConfig(data=2, model=4))
  specs = {"a": ("embed", "mlp"), "b": P("batch", "length"), "c": None}
  shapes = {"a": (4, 6), "b": jax.ShapeDtypeStruct((8, 3), jnp.int32),
            "c": (5,)}
  with caplog.at_level(logging.WARNING):
    shardings = sharding.logical_to_sharding(specs, mesh, shapes=shapes)
  assert shardings["a"].spec == P(None, None)  # 4 does not divide 6.
  assert shardings["b"].spec == P(("partition", "data"), None)
  assert shardings["c"].spec == P(None)
  assert "dim 1 (size 6)" in caplog.text


# ---------------------------------------------------------------- params


def test_params_shardings_of_partitioned_toy_module():
  mesh = sharding.make_mesh(
      MeshConfig(partition=2, data=1, expert=2, model=2))
  x_PxBxD = jnp.ones((2, 4, 8))
  model = PartitionedToy()
  abstract = jax.eval_shape(model.init, jax.random.key(0), x_PxBxD)
  shardings = sharding.params_shardings(abstract, mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings["params"])
  assert specs == {
      "mlp": {"kernel": P("partition", None, "model"),
              "bias": P("partition", "model")},
      "router": {"kernel": P("partition", None, None)},
      "expert_wi": P("partition", "expert", None, "model"),
  }
  # The shardings place real parameters: each device holds its slice.
  params = jax.jit(model.init, out_shardings=shardings)(
      jax.random.key(0), x_PxBxD)
  expert_wi = nn.unbox(params)["params"]["expert_wi"]
  assert expert_wi.shape == (2, 4, 8, 16)
  assert {s.data.shape for s in expert_wi.addressable_shards} == {(1, 2, 8, 8)}
  reference = nn.unbox(jax.jit(model.init)(jax.random.key(0), x_PxBxD))
  np.testing.assert_array_equal(expert_wi,
                                reference["params"]["expert_wi"])


def test_params_shardings_replicates_dims_the_mesh_does_not_divide(caplog):
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
  # 3 experts on a 4-way expert axis; mlp=6 on 1-way model is fine.
  model = ToyExpertLayer(num_experts=3, mlp=6)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 8)))
  with caplog.at_level(logging.WARNING):
    shardings = sharding.params_shardings(abstract, mesh)
  assert shardings["params"]["expert_wi"].spec == P(None, None, "model")
  assert "mesh axes ('expert',) -> replicated" in caplog.text
  params = jax.jit(model.init, out_shardings=shardings)(
      jax.random.key(0), jnp.ones((2, 8)))  # Placing does not crash.
  assert nn.unbox(params)["params"]["expert_wi"].shape == (3, 8, 6)


def test_params_shardings_replicates_unannotated_leaves():
  mesh = sharding.make_mesh(MeshConfig())
  tree = {"step": jax.ShapeDtypeStruct((), jnp.int32),
          "w": jax.ShapeDtypeStruct((8, 8), jnp.float32),
          "boxed": nn.LogicallyPartitioned(
              jax.ShapeDtypeStruct((8, 4), jnp.float32), ("batch", "embed"))}
  shardings = sharding.params_shardings(tree, mesh)
  assert shardings["step"].spec == P()
  assert shardings["w"].spec == P(None, None)
  assert shardings["boxed"].spec == P(("partition", "data"), None)


@pytest.mark.parametrize("spec, shape, expected, num_notes", [
    (P(("partition", "data")), (8, 3), P(("partition", "data"), None), 0),
    (P(("partition", "data")), (2, 3), P("partition", None), 1),
    (P(("partition", "data")), (3, 3), P(None, None), 1),
    (P(None, "model"), (4, 6), P(None, "model"), 0),  # model=1 divides.
    (P("data", "partition"), (6, 4), P(None, "partition"), 1),
    (P("data", "partition"), (6, 5), P(None, None), 2),
])
def test_fit_spec_to_shape(spec, shape, expected, num_notes):
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=4))
  fitted, notes = sharding.fit_spec_to_shape(spec, shape, mesh)
  assert fitted == expected
  assert len(notes) == num_notes


def test_fit_spec_rejects_spec_longer_than_shape():
  mesh = sharding.make_mesh(MeshConfig())
  with pytest.raises(ValueError, match="has 2 entries"):
    sharding.fit_spec_to_shape(P("data", None), (8,), mesh)


# ---------------------------------------------------------------- batches


def test_batch_sharding_places_each_partition_on_its_devices():
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=4))
  placement = sharding.batch_sharding(mesh, 3)
  assert placement.spec == P("partition", "data", None)
  tokens_PxBxL = np.arange(2 * 8 * 3).reshape(2, 8, 3)
  batch = jax.device_put(tokens_PxBxL, placement)
  for shard in batch.addressable_shards:
    p_index, b_index = shard.index[:2]
    coords = np.argwhere(mesh.devices == shard.device)[0]
    assert p_index == slice(coords[0], coords[0] + 1)
    assert b_index == slice(2 * coords[1], 2 * coords[1] + 2)
    np.testing.assert_array_equal(shard.data, tokens_PxBxL[shard.index])


def test_batch_sharding_fallback_and_errors(caplog):
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=4))
  with caplog.at_level(logging.WARNING):
    placement = sharding.batch_sharding(mesh, 2, shape=(2, 3))
  assert placement.spec == P("partition", None)
  assert "dim 1 (size 3)" in caplog.text
  with pytest.raises(ValueError, match="ndim=1"):
    sharding.batch_sharding(mesh, 1)
  with pytest.raises(ValueError, match="ndim=3"):
    sharding.batch_sharding(mesh, 3, shape=(2, 4))


def test_with_sharding_rules_flattened_batch_keeps_layout():
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=4))
  x_PxBxL = jax.device_put(np.arange(2 * 8 * 3.0).reshape(2, 8, 3),
                           sharding.batch_sharding(mesh, 3))

  @jax.jit
  def to_shared(x_PxBxL):
    x_PxBxL = nn.with_logical_constraint(x_PxBxL,
                                         ("partition", "batch", "length"))
    x_BxL = x_PxBxL.reshape(-1, x_PxBxL.shape[-1])
    return nn.with_logical_constraint(x_BxL, ("batch", "length"))

  with sharding.with_sharding_rules(mesh):
    assert nn.get_logical_axis_rules() == sharding.LOGICAL_AXIS_RULES
    x_BxL = to_shared(x_PxBxL)
  assert nn.get_logical_axis_rules() == ()
  expected = jax.sharding.NamedSharding(mesh, P(("partition", "data"), None))
  assert x_BxL.sharding.is_equivalent_to(expected, 2)
  # Each device keeps exactly the rows it already held.
  before = {s.device: s.data for s in x_PxBxL.addressable_shards}
  for shard in x_BxL.addressable_shards:
    np.testing.assert_array_equal(shard.data,
                                  before[shard.device].reshape(-1, 3))


@pytest.mark.parametrize("sharing", ["none", "attention"])
def test_partition_vmapped_model_keeps_activations_sharded(sharing):
  """Constraints inside the vmap over partitions put the mapped axis on
  'partition' and each partition's rows on 'data': nothing is replicated, so
  per-device activations shrink with more data shards (the full-size n = 16
  model on 64 devices otherwise held every partition's logits)."""
  mesh = sharding.make_mesh(MeshConfig(partition=2, data=4))
  config = decoder_config.DecoderConfig(
      vocab_size=32, d_model=16, num_heads=2, head_dim=8, num_layers=2,
      d_ff=32, num_experts=2, expert_d_ff=8, moe_every=2, num_partitions=2,
      group_size=8, dispatch="sort_gather", sharing=sharing)
  model = transformer.TieredDecoder(config)
  with sharding.with_sharding_rules(mesh):
    tokens_PxBxL = jax.device_put(jnp.ones((2, 8, 8), jnp.int32),
                                  sharding.batch_sharding(mesh, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens_PxBxL)
    logits_PxBxLxV = jax.jit(model.apply)(variables, tokens_PxBxL)
  expected = jax.sharding.NamedSharding(mesh, P("partition", "data"))
  assert logits_PxBxLxV.sharding.is_equivalent_to(expected, 4)
