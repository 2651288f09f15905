"""Tests for tiered_routing.expert_gates and expert_params (tiny models)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiered_routing import expert_gates
from tiered_routing import expert_params
from tiered_routing import train_state
from tiered_routing.model import transformer
from tiered_routing.unlearning import token_routing

B, L, V = 8, 8, 32
NEW_LANGUAGE = 5
E = 4


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  with jax.threefry_partitionable(False):
    yield


def _config(sharing, num_partitions, dispatch="sort_gather", **kw):
  kw.setdefault("moe_every", 1)
  kw.setdefault("num_layers", 2)
  kw.setdefault("num_experts", E)
  # Capacity = all tokens of a group (factor E / K): nothing is dropped.
  kw.setdefault("capacity_factor", kw["num_experts"] / 2)
  return transformer.DecoderConfig(
      vocab_size=V,
      d_model=16,
      num_heads=2,
      head_dim=8,
      d_ff=16,
      expert_d_ff=8,
      top_k=2,
      num_partitions=num_partitions,
      sharing=sharing,
      router="sequence_gate",
      group_size=2 * L,
      dispatch=dispatch,
      **kw,
  )


def _batch(num_partitions, new_rows=(0, 1), new_partition=0):
  """One sequence per row; old languages use tokens < 16, the new one >= 16."""
  rng = np.random.default_rng(0)
  p = num_partitions
  tokens = rng.integers(1, 16, (p, B, L + 1))
  langs = np.broadcast_to(np.arange(B) % 4, (p, B)).copy()
  for r in new_rows:
    tokens[new_partition, r] = rng.integers(16, V, L + 1)
    langs[new_partition, r] = NEW_LANGUAGE
  ones = np.ones((p, B, L), np.int32)
  return {
      "decoder_input_tokens": jnp.asarray(tokens[..., :-1], jnp.int32),
      "decoder_target_tokens": jnp.asarray(tokens[..., 1:], jnp.int32),
      "decoder_loss_weights": jnp.asarray(ones, jnp.float32),
      "decoder_segment_ids": jnp.asarray(ones),
      "decoder_positions": jnp.broadcast_to(jnp.arange(L), (p, B, L)),
      "decoder_language_ids": jnp.asarray(
          np.broadcast_to(langs[..., None], (p, B, L)), jnp.int32
      ),
  }


@functools.lru_cache(maxsize=None)
def _init(config):
  """Parameters of a fresh model (cached: tests share configs)."""
  tokens = jnp.zeros((config.num_partitions, B, L), jnp.int32)
  params = jax.jit(transformer.TieredDecoder(config).init)(
      jax.random.PRNGKey(0), tokens
  )["params"]
  return train_state._strip_boxes(params)


@functools.lru_cache(maxsize=None)
def _forward(config):
  """Jitted (logits, TokenRouting, router logits per MoE layer) of a config."""
  model = transformer.TieredDecoder(config)

  def forward(params, tokens, mask):
    logits, state = model.apply(
        {"params": params},
        tokens,
        expert_mask_PxE=mask,
        capture_intermediates=token_routing.is_router_call,
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    return (
        logits,
        token_routing.token_routing(inter),
        expert_gates._router_logits(inter),
    )

  return jax.jit(forward)


def _logits_and_routing(config, params, batch, mask=None):
  logits, routed, _ = _forward(config)(
      params, batch["decoder_input_tokens"], mask
  )
  return np.asarray(logits), routed


def _train_new_expert(config, params, batch, owners, steps=25):
  mask = expert_gates.owner_expert_mask(config, owners)
  trainable = expert_params.trainable_mask(
      params,
      config,
      expert_gates.new_expert_selection(config, owners),
      include_router=True,
  )
  tx = expert_params.freeze(optax.adamw(3e-2, weight_decay=0.1), trainable)
  state = expert_gates.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  step = jax.jit(
      functools.partial(
          expert_gates.new_expert_step,
          model=transformer.TieredDecoder(config),
          tx=tx,
          config=expert_gates.NewExpertConfig(NEW_LANGUAGE),
          expert_mask_PxE=mask,
      )
  )
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state.params, history, trainable


@pytest.mark.parametrize(
    "sharing,num_partitions,owners,num_layers",
    [("all", 1, (0,), 2), ("none", 2, (1,), 1)],
)
def test_new_expert_leaves_old_sequences_bitwise_unchanged(
    sharing, num_partitions, owners, num_layers
):
  config = _config(sharing, num_partitions, num_layers=num_layers)
  batch = _batch(num_partitions, new_partition=owners[0])
  params = _init(config)
  old_logits, _ = _logits_and_routing(config, params, batch)

  grown, grown_config = expert_gates.add_expert(
      params, config, source_experts=1
  )
  assert grown_config.num_experts == E + 1
  trained, history, trainable = _train_new_expert(
      grown_config, grown, batch, owners, steps=20
  )
  # Only the added expert (weights + gate row) of the owners moved.
  for path, before in jax.tree_util.tree_flatten_with_path(grown)[0]:
    after = jax.tree_util.tree_flatten_with_path(trained)[0]
    after = dict(after)[path]
    mask = np.broadcast_to(
        dict(jax.tree_util.tree_flatten_with_path(trainable)[0])[path],
        np.shape(before),
    )
    np.testing.assert_array_equal(
        np.asarray(after)[~mask], np.asarray(before)[~mask]
    )
  assert history[-1]["lm_loss"] < history[0]["lm_loss"] - 0.5
  mask = expert_gates.owner_expert_mask(grown_config, owners)
  new_logits, routed = _logits_and_routing(grown_config, trained, batch, mask)
  ids_T = expert_gates.new_expert_ids(grown_config)[
      token_routing.token_partition_ids(new_logits.shape[:3])
  ]
  uses = np.asarray(expert_gates.uses_expert(routed, ids_T)).reshape(
      new_logits.shape[:3]
  )
  old_row = batch["decoder_language_ids"][..., 0] != NEW_LANGUAGE
  untouched = np.asarray(old_row) & ~uses.any(-1)
  assert untouched.sum() >= old_row.sum() // 2
  np.testing.assert_array_equal(new_logits[untouched], old_logits[untouched])
  # The new language's rows use the new expert after training.
  new_rows = ~np.asarray(old_row)
  assert uses.any(-1)[new_rows].all()


def test_add_expert_copies_source_and_appends_gate_row():
  config = _config("none", 2)
  batch = _batch(2)
  params = _init(config)
  rows = np.random.default_rng(1).normal(size=(2, 2, 16)).astype(np.float32)
  grown, grown_config = expert_gates.add_expert(
      params,
      config,
      source_experts=np.array([[0, 3], [1, 1]]),
      gate_rows_LxPxD=rows,
  )
  moe = lambda p, i: p["decoder"][f"layers_{i}"]["moe"]
  for i, sources in ((0, (0, 3)), (1, (1, 1))):
    old, new = moe(params, i), moe(grown, i)
    assert new["expert"]["wi"].shape == (2, E + 1, 16, 8)
    assert new["expert"]["wi_gate"].shape == (2, E + 1, 16, 8)
    for p, s in enumerate(sources):
      np.testing.assert_array_equal(
          new["expert"]["wo"][p, E], old["expert"]["wo"][p, s]
      )
      np.testing.assert_array_equal(
          new["expert"]["wo"][p, :E], old["expert"]["wo"][p]
      )
    np.testing.assert_array_equal(new["router"]["gates"][:, E], rows[i])
  assert grown_config.capacity_factor == pytest.approx(
      config.capacity_factor * (E + 1) / E
  )
  with pytest.raises(ValueError, match="source_experts"):
    expert_gates.add_expert(params, config, source_experts=E)
  with pytest.raises(ValueError, match="sequence_gate"):
    expert_gates.add_expert(
        params, dataclasses.replace(config, router="token_topk")
    )


def test_remove_expert_reroutes_to_next_best():
  config = _config("all", 1)
  batch = _batch(1)
  params = _init(config)
  logits, routed = _logits_and_routing(config, params, batch)
  old_idx = np.asarray(routed.expert_index_LxTxK)
  row_uses_ExR = np.stack(
      [(old_idx == e).any(axis=(0, 2)).reshape(B, L).any(-1) for e in range(E)]
  )
  # An expert some rows use and others do not (the data are fixed).
  removed = int(np.flatnonzero(row_uses_ExR.any(1) & ~row_uses_ExR.all(1))[0])
  small, small_config = expert_gates.remove_expert(params, config, removed)
  assert small_config.num_experts == E - 1
  for i in range(2):
    moe = small["decoder"][f"layers_{i}"]["moe"]
    assert moe["expert"]["wi"].shape == (E - 1, 16, 8)
    assert moe["router"]["gates"].shape == (E - 1, 16)
    full = params["decoder"][f"layers_{i}"]["moe"]["expert"]["wo"]
    np.testing.assert_array_equal(
        moe["expert"]["wo"],
        np.concatenate([full[:removed], full[removed + 1 :]]),
    )
  new_logits, new_routed = _logits_and_routing(small_config, small, batch)
  assert np.isfinite(new_logits).all()
  # First MoE layer: its input does not depend on the removal, so every
  # token goes to its old top-k with `removed` replaced by the next best.
  layer_logits = _forward(config)(params, batch["decoder_input_tokens"], None)[
      2
  ]
  assert len(layer_logits) == 2
  scores = np.asarray(layer_logits[0])  # Tree order: layers_0 first.
  order = np.argsort(-scores, axis=-1, kind="stable")
  expected = [
      [e - (e > removed) for e in row if e != removed][:2] for row in order
  ]
  np.testing.assert_array_equal(
      np.sort(np.asarray(new_routed.expert_index_LxTxK[0]), -1),
      np.sort(np.asarray(expected), -1),
  )
  # Rows that never used the removed expert compute exactly the same.
  used = row_uses_ExR[removed][None]
  np.testing.assert_array_equal(new_logits[~used], logits[~used])
  with pytest.raises(ValueError, match="experts"):
    expert_gates.remove_expert(params, config, E)


def test_owner_mask_and_new_expert_ids():
  config = _config("all", 2, num_experts=3)
  mask = expert_gates.owner_expert_mask(config, (1,))
  expected = np.ones((2, 6), bool)
  expected[0, 2] = expected[0, 5] = expected[1, 2] = False
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(expert_gates.new_expert_ids(config), [2, 5])
  private = _config("none", 2)
  np.testing.assert_array_equal(
      expert_gates.owner_expert_mask(private, (0,)),
      [[True] * E, [True] * (E - 1) + [False]],
  )
  assert expert_gates.owner_expert_mask(private, (0, 1)) is None
  with pytest.raises(ValueError, match="owners"):
    expert_gates.owner_expert_mask(private, (2,))


def test_freeze_keeps_frozen_entries_bitwise_under_adamw():
  params = {"a": jnp.arange(6.0).reshape(2, 3) + 0.5, "b": jnp.ones(3)}
  mask = {"a": np.array([[True], [False]]), "b": np.asarray(False)}
  tx = expert_params.freeze(optax.adamw(0.1, weight_decay=0.5), mask)
  state = tx.init(params)
  # A non-zero first moment, as restored from an earlier run.
  state = jax.tree.map(
      lambda x: x + 1.0 if x.dtype == jnp.float32 else x, state
  )
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["a"][1], [3.5, 4.5, 5.5])
  np.testing.assert_array_equal(params["b"], np.ones(3))
  assert (params["a"][0] != np.array([0.5, 1.5, 2.5])).all()
