"""Tests for tiered_routing.checkpoints on 8 simulated CPU devices."""

import asyncio
import os

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from tiered_routing import sharding
from tiered_routing.train import checkpoints


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  opt_state: dict


class Toy(nn.Module):

  @nn.compact
  def __call__(self, x_BxD):
    init = nn.initializers.normal(1.0)
    h_BxF = nn.Dense(16, kernel_init=nn.with_logical_partitioning(
        init, ("embed", "mlp")))(x_BxD)
    w_ExFxD = self.param("expert_wo", nn.with_logical_partitioning(
        init, ("expert", "expert_mlp", "embed")), (4, 16, 8))
    return jnp.einsum("bf,efd->bed", h_BxF, w_ExFxD)


def _toy_state(mesh, seed=0):
  """A sharded train-state-like pytree with several dtypes."""
  x_BxD = jnp.ones((2, 8))
  abstract = jax.eval_shape(Toy().init, jax.random.key(seed), x_BxD)
  shardings = sharding.params_shardings(abstract, mesh)
  params = nn.unbox(jax.jit(Toy().init, out_shardings=shardings)(
      jax.random.key(seed), x_BxD))["params"]
  mu = jax.tree.map(lambda p: (p * 0.5).astype(jnp.bfloat16), params)
  count = jax.device_put(
      jnp.arange(8, dtype=jnp.int32) + seed,
      NamedSharding(mesh, P(("partition", "data"))))
  return ToyState(step=jnp.array(seed, jnp.int32), params=params,
                  opt_state={"mu": mu, "count": count})


def _shardings(state, mesh):
  """Shardings for `state` on `mesh` from the logical rules."""
  params = sharding.params_shardings(
      jax.eval_shape(Toy().init, jax.random.key(0), jnp.ones((2, 8))),
      mesh)["params"]
  return ToyState(
      step=NamedSharding(mesh, P()), params=params,
      opt_state={"mu": params,
                 "count": sharding.batch_sharding(mesh, 2).update(
                     spec=P(("partition", "data")))})


def _assert_bitwise_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def test_save_restore_is_bitwise_and_keeps_metadata(tmp_path):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=4))
  state = _toy_state(mesh, seed=3)
  config_text = "MODEL_DIR = '/tmp/x'\ntrain.steps = 100  # comment\n"
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
      ckpt.restore(state)
    assert ckpt.save(5, state, {"data_step": 5, "config": config_text})
    ckpt.wait_until_finished()
    shardings = _shardings(state, mesh)
    restored = ckpt.restore(jax.eval_shape(lambda: state), shardings)
  assert restored.step == 5
  assert restored.metadata == {"data_step": 5, "config": config_text}
  assert isinstance(restored.state, ToyState)
  _assert_bitwise_equal(restored.state, state)
  for got, want in zip(jax.tree.leaves(restored.state),
                       jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_restore_onto_another_mesh_shape(tmp_path):
  mesh8 = sharding.make_mesh(sharding.MeshConfig(data=8))
  state = _toy_state(mesh8)
  assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "model")
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, state)
  mesh_2x4 = sharding.make_mesh(
      sharding.MeshConfig(data=2, model=4))
  new_shardings = _shardings(state, mesh_2x4)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(state, new_shardings).state
  _assert_bitwise_equal(restored, state)
  kernel = restored.params["Dense_0"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh_2x4.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 4)}
  count = restored.opt_state["count"]
  assert {s.data.shape for s in count.addressable_shards} == {(4,)}


def test_interval_and_keep_n(tmp_path):
  mesh = sharding.make_mesh(sharding.MeshConfig())
  state = _toy_state(mesh)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=2,
                                max_to_keep=2) as ckpt:
    saved = [ckpt.save(step, state, {"step": step}) for step in range(1, 8)]
    assert ckpt.save(7, state, force=True)
  # The first save of an empty directory always happens (orbax policy).
  assert saved == [True, True, False, True, False, True, False]
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.latest_step() == 7
    assert ckpt.restore_metadata(6) == {"step": 6}
    with pytest.raises(ValueError, match=r"step=4 .* available: \[6, 7\]"):
      ckpt.restore(state, step=4)
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoints.Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps=0"):
    checkpoints.Checkpointer(tmp_path, save_interval_steps=0)


def _slow_down_orbax_tmp_cleanup(monkeypatch):
  """Delays orbax's background deletion of leftovers by half a second.

  Orbax runs it on a thread that `close` does not join; the delay makes a
  Checkpointer that does not wait for it fail every time, not just on a busy
  machine.
  """
  from orbax.checkpoint._src.path import temporary_paths  # pylint: disable=g-import-not-at-top
  original = temporary_paths.cleanup_temporary_paths

  async def slow(*args, **kwargs):
    await asyncio.sleep(0.5)
    return await original(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow)


def test_incomplete_checkpoint_is_ignored(tmp_path, monkeypatch):
  _slow_down_orbax_tmp_cleanup(monkeypatch)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  state10, state20 = _toy_state(mesh, seed=10), _toy_state(mesh, seed=20)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    ckpt.save(10, state10, {"data_step": 10})
    ckpt.save(20, state20, {"data_step": 20})
  # A kill during the save of step 20 leaves it in orbax's temporary
  # directory, fully or half written; make both kinds of leftover.
  os.rename(tmp_path / "20", tmp_path / "20.orbax-checkpoint-tmp-1234")
  half = tmp_path / "30.orbax-checkpoint-tmp-5678" / "state"
  half.mkdir(parents=True)
  (half / "partial").write_bytes(b"\0" * 10)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    assert ckpt.all_steps() == [10]
    restored = ckpt.restore(state10)
  assert restored.step == 10 and restored.metadata == {"data_step": 10}
  _assert_bitwise_equal(restored.state, state10)
  assert sorted(os.listdir(tmp_path)) == ["10"]  # Leftovers cleaned up.


def test_restore_params_only(tmp_path):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, model=2))
  state = _toy_state(mesh, seed=1)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    host_params = ckpt.restore_params()
    device_params = ckpt.restore_params(
        abstract_params=checkpoints.abstract_like(
            state.params, _shardings(state, mesh).params))
    with pytest.raises(ValueError, match="key='weights' .* 'params'"):
      ckpt.restore_params(key="weights")
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host_params))
  _assert_bitwise_equal(host_params, state.params)
  _assert_bitwise_equal(device_params, state.params)
  assert (device_params["expert_wo"].sharding.spec
          == state.params["expert_wo"].sharding.spec)
