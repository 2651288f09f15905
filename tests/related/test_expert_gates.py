"""Tests for related.expert_gates and model.expert_params (tiny models)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import transformer
from tiered_routing.related import expert_gates
from tiered_routing.tier1 import layout
from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state

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
  return decoder_config.DecoderConfig(
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
  """One sequence per row; old languages use tokens < 16, the new one >= 16.

  Row r ends in r % 3 padding tokens (segment id 0, loss weight 0), as packed
  batches do: padding must not disturb sequence-gate routing or training.
  """
  rng = np.random.default_rng(0)
  p = num_partitions
  tokens = rng.integers(1, 16, (p, B, L + 1))
  langs = np.broadcast_to(np.arange(B) % 4, (p, B)).copy()
  for r in new_rows:
    tokens[new_partition, r] = rng.integers(16, V, L + 1)
    langs[new_partition, r] = NEW_LANGUAGE
  real = np.broadcast_to(
      np.arange(L)[None, :] < L - np.arange(B)[:, None] % 3, (p, B, L)
  )
  tokens[..., :-1] *= real
  ones = real.astype(np.int32)
  return {
      "decoder_input_tokens": jnp.asarray(tokens[..., :-1], jnp.int32),
      "decoder_target_tokens": jnp.asarray(tokens[..., 1:] * real, jnp.int32),
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
def _trained_base(config, steps=8):
  """A base model trained (AdamW, load-balance loss) on the old languages.

  The batches have padding like packed ones; every step must stay finite
  (sequence gates once had NaN gradients on padding tokens).
  """
  model = transformer.TieredDecoder(config)
  params = _init(config)
  tx = optax.adamw(1e-2)
  step = jax.jit(
      functools.partial(
          steps_lib.train_step,
          objective=steps_lib.LmObjective(
              model, steps_lib.TrainConfig(train_steps=steps)
          ),
          tx=tx,
      )
  )
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  batch = _batch(config.num_partitions, new_rows=())
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    assert bool(metrics["finite"]), jax.device_get(metrics)
  return jax.device_get(state.params)


@functools.lru_cache(maxsize=None)
def _forward(config):
  """Jitted (logits, TokenRouting, router logits per MoE layer) of a config."""
  model = transformer.TieredDecoder(config)

  def forward(params, batch, mask):
    out = forward_lib.forward(
        model, params, batch, expert_mask_PxE=mask, capture_routing=True
    )
    return (
        out.logits_PxBxLxV,
        out.routing,
        expert_gates._router_logits(out.intermediates),
    )

  return jax.jit(forward)


def _logits_and_routing(config, params, batch, mask=None):
  logits, routed, _ = _forward(config)(params, batch, mask)
  return np.asarray(logits), routed


def _train_new_expert(config, params, batch, owners, steps=25):
  mask = expert_gates.owner_expert_mask(config, owners)
  trainable = expert_params.trainable_mask(
      params,
      config,
      expert_gates.new_expert_selection(config, owners),
      include_router=True,
  )
  tx = optax.adamw(3e-2, weight_decay=0.1)
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  objective = expert_gates.NewExpertObjective(
      transformer.TieredDecoder(config),
      expert_gates.NewExpertConfig(NEW_LANGUAGE),
      expert_mask_PxE=mask,
  )
  step = jax.jit(
      functools.partial(steps_lib.train_step, objective=objective, tx=tx)
  )
  inputs = steps_lib.StepInputs(
      update_mask=jax.tree.map(lambda m: np.asarray(m, np.float32), trainable)
  )
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.PRNGKey(0), inputs)
    history.append(jax.device_get(metrics))
  return state.params, history, trainable


def _assert_only_trainable_moved(before, after, trainable):
  flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
  flat_mask = dict(jax.tree_util.tree_flatten_with_path(trainable)[0])
  for path, old in jax.tree_util.tree_flatten_with_path(before)[0]:
    mask = np.broadcast_to(flat_mask[path], np.shape(old))
    np.testing.assert_array_equal(
        np.asarray(flat_after[path])[~mask], np.asarray(old)[~mask]
    )


@pytest.mark.parametrize(
    "sharing,num_partitions,owners,num_layers,trained_base",
    [("all", 1, (0,), 2, True), ("none", 2, (1,), 1, False)],
)
def test_new_expert_leaves_old_sequences_bitwise_unchanged(
    sharing, num_partitions, owners, num_layers, trained_base
):
  config = _config(sharing, num_partitions, num_layers=num_layers)
  batch = _batch(num_partitions, new_partition=owners[0])
  params = (_trained_base if trained_base else _init)(config)
  old_logits, _ = _logits_and_routing(config, params, batch)

  grown, grown_config = expert_gates.add_expert(
      params, config, source_experts=1
  )
  assert grown_config.num_experts == E + 1
  trained, history, trainable = _train_new_expert(
      grown_config, grown, batch, owners, steps=20
  )
  # Only the added expert (weights + gate row) of the owners moved.
  _assert_only_trainable_moved(grown, trained, trainable)
  assert history[-1]["lm_loss"] < history[0]["lm_loss"] - 0.5
  mask = expert_gates.owner_expert_mask(grown_config, owners)
  new_logits, routed = _logits_and_routing(grown_config, trained, batch, mask)
  ids_T = expert_gates.new_expert_ids(grown_config)[
      layout.token_partition_ids(new_logits.shape[:3])
  ]
  uses = np.asarray(expert_gates.uses_expert(routed, ids_T)).reshape(
      new_logits.shape[:3]
  )
  old_row = batch["decoder_language_ids"][..., 0] != NEW_LANGUAGE
  untouched = np.asarray(old_row) & ~uses.any(-1)
  assert untouched.sum() >= old_row.sum() // 2
  np.testing.assert_array_equal(new_logits[untouched], old_logits[untouched])
  # Routing is per token and causal: in every row (one sequence each), the
  # tokens before the first one that reaches the new expert are unchanged.
  before_first_use = ~np.logical_or.accumulate(uses, axis=-1)
  np.testing.assert_array_equal(
      new_logits[before_first_use], old_logits[before_first_use]
  )
  # ... which covers tokens of rows that do reach it later.
  assert (before_first_use & uses.any(-1, keepdims=True)).any()
  # The new language's rows use the new expert after training.
  new_rows = ~np.asarray(old_row)
  assert uses.any(-1)[new_rows].all()

  # Removing the trained expert gives back the base model exactly: its
  # sequences route around it to their old experts (exact forgetting).
  back, back_config = expert_gates.remove_expert(trained, grown_config, E)
  assert back_config == config
  jax.tree.map(np.testing.assert_array_equal, back, params)
  if mask is None:  # Old-expert removal once (compile time).
    _check_removal_reroutes(grown_config, trained, batch)


def _check_removal_reroutes(config, params, batch):
  """Removing an old expert of a trained model reroutes only its users."""
  logits, routed = _logits_and_routing(config, params, batch)
  valid = np.asarray(batch["decoder_segment_ids"]).reshape(-1) > 0
  old_idx = np.asarray(routed.expert_index_MxTxK)
  row_uses_ExR = np.stack(
      [
          ((old_idx == e).any(axis=(0, 2)) & valid).reshape(-1, L).any(-1)
          for e in range(config.num_experts)
      ]
  )
  # An old expert (not the added last one) some rows use and others do not.
  some = (row_uses_ExR.any(1) & ~row_uses_ExR.all(1))[:-1]
  removed = int(np.flatnonzero(some)[0])
  small, small_config = expert_gates.remove_expert(params, config, removed)
  assert small_config.num_experts == config.num_experts - 1
  for i in range(config.num_layers):
    moe = small["decoder"][f"layers_{i}"]["moe"]
    full = params["decoder"][f"layers_{i}"]["moe"]["expert"]["wo"]
    assert moe["router"]["gates"].shape == (config.num_experts - 1, 16)
    np.testing.assert_array_equal(
        moe["expert"]["wo"],
        np.concatenate([full[:removed], full[removed + 1 :]]),
    )
  new_logits, new_routed = _logits_and_routing(small_config, small, batch)
  assert np.isfinite(new_logits).all()
  # First MoE layer: its input does not depend on the removal, so every
  # token goes to its old top-k with `removed` replaced by the next best.
  layer_logits = _forward(config)(params, batch, None)[2]
  order = np.argsort(-np.asarray(layer_logits[0]), axis=-1, kind="stable")
  expected = [
      [e - (e > removed) for e in row if e != removed][:2] for row in order
  ]
  np.testing.assert_array_equal(
      np.sort(np.asarray(new_routed.expert_index_MxTxK[0]), -1)[valid],
      np.sort(np.asarray(expected), -1)[valid],
  )
  # Rows that never used the removed expert compute exactly the same.
  used = row_uses_ExR[removed].reshape(logits.shape[:2])
  np.testing.assert_array_equal(new_logits[~used], logits[~used])
  with pytest.raises(ValueError, match="experts"):
    expert_gates.remove_expert(params, config, config.num_experts)


def test_add_expert_copies_source_and_appends_gate_row():
  config = _config("none", 2)
  params = _init(config)
  rows = np.random.default_rng(1).normal(size=(2, 2, 16)).astype(np.float32)
  grown, grown_config = expert_gates.add_expert(
      params,
      config,
      source_experts=np.array([[0, 3], [1, 1]]),
      gate_rows_MxPxD=rows,
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
