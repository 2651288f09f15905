"""Tests for related.esft: ESFT, forced routing and router LoRA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.eval import routing_counts
from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.model import transformer
from tiered_routing.related import esft
from tiered_routing.tier1 import languages
from tiered_routing.train import loop
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state

P, B, L, V, E = 2, 4, 8, 64, 4
# Partition 0 holds languages 0 and 1, partition 1 languages 2 and 3.
LANGS_PxB = np.array([[0, 1, 0, 1], [2, 3, 2, 3]])


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  with jax.threefry_partitionable(False):
    yield


def _config(sharing="attention", router="token_topk"):
  return decoder_config.DecoderConfig(
      vocab_size=V,
      d_model=16,
      num_heads=2,
      head_dim=8,
      num_layers=2,
      d_ff=16,
      num_experts=E,
      expert_d_ff=8,
      top_k=2,
      moe_every=1,
      num_partitions=P,
      sharing=sharing,
      router=router,
      group_size=2 * L,
      dispatch="reference",
  )


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, (P, B, L + 1))
  ones = np.ones((P, B, L), np.int32)
  return {
      "decoder_input_tokens": tokens[..., :-1].astype(np.int32),
      "decoder_target_tokens": tokens[..., 1:].astype(np.int32),
      "decoder_loss_weights": ones.astype(np.float32),
      "decoder_segment_ids": ones,
      "decoder_positions": np.broadcast_to(np.arange(L), (P, B, L)).copy(),
      "decoder_language_ids": (
          np.broadcast_to(LANGS_PxB[..., None], (P, B, L))
          .astype(np.int32)
          .copy()
      ),
  }


@functools.lru_cache(maxsize=None)
def _setup(sharing):
  config = _config(sharing)
  model = transformer.TieredDecoder(config)
  boxed = jax.jit(model.init)(
      jax.random.PRNGKey(0), jnp.zeros((P, B, L), jnp.int32)
  )["params"]
  return config, model, boxed, train_state._strip_boxes(boxed)


def _tx(boxed, partitioned=None):
  return optimizers.make_optimizer(
      optimizers.OptimizerConfig(
          learning_rate=1e-2,
          warmup_steps=0,
          schedule="constant",
          weight_decay=0.1,
      ),
      10,
      optimizers.partitioned_mask(boxed)
      if partitioned is None
      else partitioned,
  )


def _steps(objective, tx, params, opt_state, n, mask=None):
  """n steps of the one loop; `mask` (bool tree) = which entries train."""
  step = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=tx)
  )
  inputs = steps.StepInputs(
      update_mask=None
      if mask is None
      else jax.tree.map(lambda m: np.asarray(m, np.float32), mask)
  )
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state
  )
  state, _ = loop.run(
      lambda st, b: step(st, b, jax.random.PRNGKey(0), inputs),
      state,
      (_batch(i) for i in range(n)),
      start=0,
      end=n,
  )
  return state


def _lm(model, n, **kwargs):
  return steps.LmObjective(model, steps.TrainConfig(train_steps=n), **kwargs)


def test_select_experts_cumulative_threshold():
  relevance = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.7, 0.1]])
  np.testing.assert_array_equal(
      esft.select_experts(relevance, 0.6),
      [[True, True, False, False], [False, False, True, False]],
  )
  # p = 1 takes every expert with any relevance, never an unused one.
  np.testing.assert_array_equal(
      esft.select_experts(relevance, 1.0),
      [[True, True, True, False], [True, True, True, True]],
  )
  # Ties go to the lower index; a tiny p still takes one expert.
  np.testing.assert_array_equal(
      esft.select_experts([[0.25] * 4], 1e-3), [[True] + [False] * 3]
  )
  with pytest.raises(ValueError, match="coverage"):
    esft.select_experts(relevance, 0.0)


def test_expert_relevance_token_and_gate():
  counts = routing_counts.RoutingCounts(num_layers=1, num_experts=3)
  # Two tokens of 'hi', top-2 routing with weights.
  counts.add(
      0,
      np.array([[0, 1], [0, 2]]),
      np.array([[0.75, 0.25], [0.5, 0.5]]),
      np.full(2, languages.language_id("hi")),
  )
  counts.add(
      0,
      np.array([[2, 1]]),
      np.array([[0.9, 0.1]]),
      np.full(1, languages.language_id("en")),
  )
  np.testing.assert_allclose(
      esft.expert_relevance(counts, ["hi"]), [[1.0, 0.5, 0.5]]
  )
  np.testing.assert_allclose(
      esft.expert_relevance(counts, ["hi"], "gate"), [[0.625, 0.125, 0.25]]
  )
  np.testing.assert_allclose(
      esft.expert_relevance(counts, ["hi", "en"]), [[2 / 3, 2 / 3, 2 / 3]]
  )
  with pytest.raises(ValueError, match="No routed tokens"):
    esft.expert_relevance(counts, ["ur"])


def test_esft_trains_only_chosen_experts_even_with_adam_momentum():
  config, model, boxed, params = _setup("attention")
  counts = esft.collect_routing(config, params, [_batch(0), _batch(1)])
  # Partition 1's languages ids 2 and 3 route only through partition 1.
  assert counts.tokens_NxM[2:4].sum() == 2 * 2 * B // 2 * L * 2
  assert counts.tokens_NxM[4:].sum() == 0
  codes = [languages.CODES[2], languages.CODES[3]]
  chosen_MxE = esft.select_experts(
      esft.expert_relevance(counts, codes), 0.5
  )
  assert 0 < chosen_MxE.sum() < chosen_MxE.size
  selection = esft.to_selection(chosen_MxE, config, partitions=[1])
  mask = esft.trainable_mask(params, config, selection)
  tx = _tx(boxed)
  # Non-zero Adam moments everywhere, as when resuming from pre-training.
  opt_state = jax.tree.map(
      lambda x: x + 0.01 if x.dtype == jnp.float32 else x, tx.init(params)
  )
  state = _steps(_lm(model, 3), tx, params, opt_state, 3, mask)
  flat_mask = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
  for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
    after = np.asarray(
        dict(jax.tree_util.tree_flatten_with_path(state.params)[0])[path]
    )
    m = np.broadcast_to(flat_mask[path], after.shape)
    np.testing.assert_array_equal(after[~m], np.asarray(before)[~m])
  for layer in range(2):
    wi = state.params["decoder"][f"layers_{layer}"]["moe"]["expert"]["wi"]
    old = params["decoder"][f"layers_{layer}"]["moe"]["expert"]["wi"]
    for e in range(E):
      changed = bool((wi[1, e] != old[1, e]).all())
      assert changed == chosen_MxE[layer, e], (layer, e)
  assert expert_params.count_trainable(params, mask) == (
      chosen_MxE.sum() * 3 * 16 * 8
  )


def test_forced_routing_keeps_partition_tokens_on_chosen_experts():
  config, model, _, params = _setup("attention")
  chosen = np.array([[True, False, True, False], [False, True, False, False]])
  mask = esft.forced_routing_mask(chosen, config, partitions=[1])
  counts = esft.collect_routing(
      config, params, [_batch(0)], expert_mask_MxPxE=mask
  )
  for layer in range(2):
    used = counts.assignments_NxMxE[2:4, layer].sum(0) > 0
    np.testing.assert_array_equal(used, chosen[layer])
  # Partition 0 is unconstrained: top-2 of 4 reaches more than one expert.
  assert (counts.assignments_NxMxE[0:2, 1].sum(0) > 0).sum() >= 2
  with pytest.raises(ValueError, match="at least one expert"):
    esft.forced_routing_mask(np.zeros((2, E), bool), config, [1])


@pytest.mark.parametrize(
    "sharing,router", [("attention", "token_topk"), ("all", "sequence_gate")]
)
def test_router_lora_adds_only_adapters_and_starts_at_base(sharing, router):
  config = _config(sharing, router)
  model = transformer.TieredDecoder(config)
  boxed = jax.jit(model.init)(
      jax.random.PRNGKey(0), jnp.zeros((P, B, L), jnp.int32)
  )["params"]
  params = train_state._strip_boxes(boxed)
  rank = 3
  lora = esft.init_router_lora(params, config, rank, jax.random.PRNGKey(1))
  size = lambda t: sum(int(np.size(x)) for x in jax.tree.leaves(t))
  assert (
      size(lora)
      == esft.lora_param_count(config, rank)
      == (
          2
          * (1 if sharing == "all" else P)
          * rank
          * (16 + config.experts_per_layer)
      )
  )
  paths = [
      expert_params.path_names(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]
  ]
  assert all("router" in p for p in paths)
  view = esft.lora_view(8.0)
  both = {"base": params, "lora": lora}
  tokens = _batch(0)["decoder_input_tokens"]
  logits = jax.jit(
      lambda base, both: (
          model.apply({"params": base}, tokens),
          model.apply({"params": view(both)}, tokens),
      )
  )
  base_logits, lora_logits = logits(params, both)
  np.testing.assert_array_equal(lora_logits, base_logits)
  if sharing == "all":  # Training is covered once (compile time).
    return
  partitioned = {
      "base": optimizers.partitioned_mask(boxed),
      "lora": jax.tree.map(lambda _: sharing != "all", lora),
  }
  tx = _tx(boxed, partitioned)
  state = _steps(
      _lm(model, 3, params_view=view),
      tx,
      both,
      tx.init(both),
      3,
      esft.lora_trainable_mask(both),
  )
  jax.tree.map(np.testing.assert_array_equal, state.params["base"], params)
  for names, b in jax.tree_util.tree_flatten_with_path(state.params["lora"])[0]:
    if expert_params.path_names(names)[-1] == "lora_b":
      assert bool(jnp.any(b != 0)), names
  assert not np.array_equal(logits(params, state.params)[1], base_logits)
