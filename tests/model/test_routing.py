"""Routers, their registry, auxiliary losses and the tier-1 partition mask."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import dispatch
from tiered_routing.model import router_registry
from tiered_routing.model import routing
from tiered_routing.model import sequence_gates
from tiered_routing.tier1 import layout

D = 8


@pytest.fixture(autouse=True, scope='module')
def _fast_compile():
  """These tests compile many tiny programs; skip XLA's costly optimizations.

  Optimization level changes speed, not results; restored afterwards.
  """
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


# Jitted and cached: eager op-by-op execution and recompiles dominate the
# run time of these tiny tests.
@functools.lru_cache(maxsize=None)
def _jit_apply(router, deterministic):
  return jax.jit(functools.partial(router.apply, deterministic=deterministic))


@functools.lru_cache(maxsize=None)
def _jit_init(router):
  return jax.jit(router.init_with_output)


def _apply(router, variables, x, deterministic=True, **kwargs):
  return _jit_apply(router, deterministic)(variables, x, **kwargs)


def _init_apply(router, x, rng=0, **kwargs):
  out, variables = _jit_init(router)(jax.random.PRNGKey(rng), x, **kwargs)
  return variables, out


_moe_mlp = jax.jit(dispatch.moe_mlp, static_argnames=('impl', 'capacity'))


def _with_kernel(kernel_DxE):
  return {'params': {'kernel': jnp.asarray(kernel_DxE, jnp.float32)}}


# ----------------------------------------------------------------- token top-k


def test_topk_weights_sum_to_one_and_follow_probabilities():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, D))
  router = routing.TokenTopKRouter(num_experts=8, top_k=3)
  variables, out = _init_apply(router, x)
  np.testing.assert_allclose(out.combine_weights_TxK.sum(-1), 1.0, rtol=1e-6)
  probs = np.asarray(out.router_probs_TxE)
  chosen = np.take_along_axis(probs, np.asarray(out.expert_index_TxK), -1)
  np.testing.assert_array_equal(chosen, -np.sort(-probs, axis=-1)[:, :3])
  np.testing.assert_allclose(
      out.combine_weights_TxK, chosen / chosen.sum(-1, keepdims=True),
      rtol=1e-6)
  raw = _apply(routing.TokenTopKRouter(8, 3, renormalize=False), variables, x)
  np.testing.assert_allclose(raw.combine_weights_TxK, chosen, rtol=1e-6)
  assert out.combine_weights_TxK.dtype == jnp.float32


def test_router_computes_in_float32_for_bfloat16_inputs():
  x = jax.random.normal(jax.random.PRNGKey(1), (16, D))
  router = routing.TokenTopKRouter(num_experts=4, top_k=2)
  variables, out32 = _init_apply(router, x)
  out16 = _apply(router, variables, x.astype(jnp.bfloat16))
  assert out16.router_logits_TxE.dtype == jnp.float32
  assert out16.combine_weights_TxK.dtype == jnp.float32
  np.testing.assert_allclose(out16.router_probs_TxE, out32.router_probs_TxE,
                             atol=2e-2)


def test_load_balance_loss_is_one_at_balance_and_larger_when_collapsed():
  # Token t is a one-hot on feature t; kernel 3*I sends it to expert t, and
  # the probability matrix is circulant, so f_e = P_e = 1/E exactly.
  e = 4
  x = jnp.eye(e, D)
  router = routing.TokenTopKRouter(num_experts=e, top_k=1)
  balanced = _apply(router, _with_kernel(3 * np.eye(D, e)), x)
  np.testing.assert_array_equal(balanced.expert_index_TxK[:, 0], np.arange(e))
  assert float(balanced.load_balance_loss) == pytest.approx(1.0, abs=1e-5)
  # A kernel column favouring expert 0 for every token: f_0 = 1, so the loss
  # is E * P_0 = 4 * mean probability of expert 0.
  kernel = np.zeros((D, e))
  kernel[:, 0] = 3.0
  collapsed = _apply(router, _with_kernel(kernel), x)
  np.testing.assert_array_equal(collapsed.expert_index_TxK, 0)
  p0 = math.exp(3) / (math.exp(3) + 3)
  assert float(collapsed.load_balance_loss) == pytest.approx(e * p0, rel=1e-5)
  assert float(collapsed.load_balance_loss) > 1.0


def test_load_balance_loss_is_one_at_balance_within_a_partition_mask():
  # Two partitions of 2 experts; all 4 tokens in partition 1: balance over
  # experts {2, 3} is the best the mask allows and scores 1.0.
  x = jnp.eye(4, D)
  mask = layout.partition_expert_mask(jnp.ones(4, jnp.int32), 2, 2)
  kernel = np.zeros((D, 4))
  kernel[[0, 2], 2] = kernel[[1, 3], 3] = 3.0
  out = _apply(routing.TokenTopKRouter(4, 1), _with_kernel(kernel), x,
                                            expert_mask_TxE=mask)
  np.testing.assert_array_equal(out.expert_index_TxK[:, 0], [2, 3, 2, 3])
  assert float(out.load_balance_loss) == pytest.approx(1.0, abs=1e-5)


def test_z_loss_matches_hand_computation():
  x = jax.random.normal(jax.random.PRNGKey(2), (10, D))
  kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (D, 5)))
  out = _apply(routing.TokenTopKRouter(5, 2), _with_kernel(kernel), x)
  logits = np.asarray(x, np.float64) @ kernel
  lse = np.log(np.exp(logits).sum(-1))
  assert float(out.z_loss) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
  np.testing.assert_allclose(out.router_logits_TxE, logits, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('impl', ['einsum', 'sort_gather', 'ragged'])
def test_masked_expert_is_never_chosen_and_gets_zero_gradient(impl):
  t, e, f, banned = 48, 6, 8, 2
  ks = jax.random.split(jax.random.PRNGKey(4), 4)
  x = jax.random.normal(ks[0], (t, D))
  wi = jax.random.normal(ks[1], (e, D, f))
  wo = jax.random.normal(ks[2], (e, f, D))
  mask = jnp.ones((t, e), bool).at[:, banned].set(False)
  router = routing.TokenTopKRouter(e, top_k=2)
  variables = nn.unbox(jax.jit(router.init)(ks[3], x))

  def loss(variables, wi, wo):
    route = router.apply(variables, x, expert_mask_TxE=mask)
    y, _ = dispatch.moe_mlp(x, route, wi, wo, impl=impl, capacity_factor=2.0)
    return jnp.sum(y ** 2) + route.load_balance_loss + route.z_loss, route

  (_, route), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2),
                                                 has_aux=True))(
                                                     variables, wi, wo)
  assert not np.any(np.asarray(route.expert_index_TxK) == banned)
  assert np.all(np.asarray(route.router_probs_TxE)[:, banned] == 0.0)
  g_router, g_wi, g_wo = grads
  assert np.all(np.asarray(g_wi[banned]) == 0.0)
  assert np.all(np.asarray(g_wo[banned]) == 0.0)
  assert np.all(np.asarray(g_router['params']['kernel'])[:, banned] == 0.0)
  assert np.any(np.asarray(g_wi[(banned + 1) % e]) != 0.0)


def test_jitter_only_when_not_deterministic():
  x = jax.random.normal(jax.random.PRNGKey(5), (32, D))
  router = routing.TokenTopKRouter(8, 2, jitter_noise=0.2)
  variables = jax.jit(router.init)(jax.random.PRNGKey(0), x)
  clean = _apply(router, variables, x)  # No 'jitter' rng needed.
  noisy = [_apply(router, variables, x, deterministic=False,
                  rngs={'jitter': jax.random.PRNGKey(s)}).router_logits_TxE
           for s in (1, 2)]
  assert not np.allclose(noisy[0], clean.router_logits_TxE)
  assert not np.allclose(noisy[0], noisy[1])
  no_jitter = _apply(routing.TokenTopKRouter(8, 2), variables, x,
                                                  deterministic=False)
  np.testing.assert_array_equal(no_jitter.router_logits_TxE,
                                clean.router_logits_TxE)


def test_padding_tokens_are_routed_nowhere():
  x = jax.random.normal(jax.random.PRNGKey(6), (6, D))
  seg = jnp.array([1, 1, 2, 2, 0, 0])
  for router in (routing.TokenTopKRouter(4, 2),
                 sequence_gates.SequenceGateRouter(4, 2),
                 routing.ExpertChoiceRouter(4, 2.0)):
    _, out = _init_apply(router, x, segment_ids_T=seg)
    np.testing.assert_array_equal(out.combine_weights_TxK[4:], 0.0)
    assert np.all(np.asarray(out.combine_weights_TxK[:4]).sum(-1) > 0)


# --------------------------------------------------------------- expert choice


def test_expert_choice_every_expert_takes_exactly_capacity_tokens():
  t, e, cf = 40, 8, 1.5
  x = jax.random.normal(jax.random.PRNGKey(7), (t, D))
  router = routing.ExpertChoiceRouter(num_experts=e, capacity_factor=cf)
  _, out = _init_apply(router, x)
  c = math.ceil(t * cf / e)
  assert router.capacity(t) == c
  weights = np.asarray(out.combine_weights_TxK)
  assert weights.shape == (t, e)
  np.testing.assert_array_equal((weights > 0).sum(0), c)
  np.testing.assert_array_equal(out.expert_index_TxK,
                                np.broadcast_to(np.arange(e), (t, e)))
  probs = np.asarray(out.router_probs_TxE)
  for expert in range(e):  # Each expert took its top-C tokens by probability.
    top = set(np.argsort(-probs[:, expert])[:c])
    assert set(np.nonzero(weights[:, expert])[0]) == top
  np.testing.assert_allclose(weights[weights > 0], probs[weights > 0])
  assert float(out.load_balance_loss) == 0.0
  # With the router's capacity the capacity dispatch drops nothing.
  wi = jax.random.normal(jax.random.PRNGKey(8), (e, D, 4))
  wo = jax.random.normal(jax.random.PRNGKey(9), (e, 4, D))
  y_ref, _ = _moe_mlp(x, out, wi, wo, impl='reference')
  y, stats = _moe_mlp(x, out, wi, wo, impl='sort_gather', capacity=c)
  assert float(stats.dropped_fraction) == 0.0
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ hash


def test_hash_router_is_a_fixed_function_of_the_token_id():
  e, vocab = 8, 1000
  ids = jax.random.randint(jax.random.PRNGKey(10), (200,), 0, 20)
  router = routing.HashRouter(num_experts=e, vocab_size=vocab)
  outs = []
  for rng in (0, 1):
    x = jax.random.normal(jax.random.PRNGKey(rng), (200, D))
    variables, out = _init_apply(router, x, rng=rng, token_ids_T=ids)
    assert not jax.tree.leaves(variables)  # No parameters at all.
    outs.append(np.asarray(out.expert_index_TxK[:, 0]))
  np.testing.assert_array_equal(outs[0], outs[1])  # Independent of x.
  table = np.asarray(routing.hash_expert_table(vocab, e))[:, 0]
  np.testing.assert_array_equal(outs[0], table[np.asarray(ids)])
  # A different seed is a different table; any table is roughly balanced.
  other = np.asarray(routing.hash_expert_table(vocab, e, seed=1))[:, 0]
  assert np.mean(other != table) > 0.5
  counts = np.bincount(table, minlength=e)
  assert counts.min() > 0.6 * vocab / e and counts.max() < 1.4 * vocab / e


def test_hash_router_top_k_distinct_and_needs_token_ids():
  ids = jnp.arange(50)
  router = routing.HashRouter(num_experts=6, vocab_size=50, top_k=2)
  _, out = _init_apply(router, jnp.zeros((50, D)), token_ids_T=ids)
  idx = np.asarray(out.expert_index_TxK)
  assert np.all(idx[:, 0] != idx[:, 1])
  np.testing.assert_allclose(out.combine_weights_TxK, 0.5)
  with pytest.raises(ValueError, match='token_ids_T'):
    router.apply({}, jnp.zeros((50, D)))


# --------------------------------------------------------------- sequence gates


SEG = jnp.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 5, 0, 0])


def _sequence_routing(num_experts=4, top_k=2, x_rng=11, causal=True):
  x = jax.random.normal(jax.random.PRNGKey(x_rng), (SEG.shape[0], D))
  router = sequence_gates.SequenceGateRouter(
      num_experts=num_experts, top_k=top_k, causal=causal)
  variables, out = _init_apply(router, x, segment_ids_T=SEG)
  return x, router, variables, out


def _segment_means(x, seg, causal):
  """numpy reference: per token, the mean of its segment (prefix if causal)."""
  x, seg = np.asarray(x, np.float64), np.asarray(seg)
  t = np.arange(len(seg))
  return np.stack([x[(seg == seg[i]) & ((t <= i) | (not causal))].mean(0)
                   for i in t])


@pytest.mark.parametrize('causal', [True, False])
def test_sequence_gates_route_tokens_by_their_segment_mean(causal):
  # Causal (default): token t by the mean of its segment's tokens <= t;
  # causal=False: by the whole segment's mean (tokens of a segment agree).
  x, _, variables, out = _sequence_routing(causal=causal)
  gates = np.asarray(nn.unbox(variables['params']['gates']))
  scores = 1 / (1 + np.exp(-_segment_means(x, SEG, causal) @ gates.T))
  idx = np.asarray(out.expert_index_TxK)
  for t in range(14):
    top = np.argsort(-scores[t])[:2]
    np.testing.assert_array_equal(idx[t], top)
    np.testing.assert_allclose(out.combine_weights_TxK[t],
                               scores[t, top] / scores[t, top].sum(),
                               rtol=1e-5)
  np.testing.assert_array_equal(out.combine_weights_TxK[14:], 0.0)
  differs = [np.any(idx[SEG == s] != idx[SEG == s][0]) for s in range(1, 6)]
  assert any(differs) == causal


@pytest.mark.parametrize('seg', [
    [1, 1, 2, 2, 1, 1, 0, 3, 3, 0],  # Id 1 in two runs: one segment.
    [5, 5, 5, 9, 9, 0, 0, 40000],    # Ids above T.
    [3], [0, 0, 0]])
@pytest.mark.parametrize('causal', [True, False])
def test_segment_mean_handles_any_id_layout(seg, causal):
  seg = np.asarray(seg)
  v = np.random.default_rng(len(seg)).normal(size=(len(seg), 3))
  got = sequence_gates.segment_mean(jnp.asarray(v, jnp.float32),
                                    jnp.asarray(seg), causal=causal)
  np.testing.assert_allclose(got, _segment_means(v, seg, causal), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_sequence_gate_routing_reads_no_later_token(causal):
  # Changing token s changes no routing output of a token t < s, and none of
  # another segment's, bit for bit; the whole-segment mean does read s.
  x, router, variables, out = _sequence_routing(causal=causal)
  s = 7  # Third token of segment 3 (tokens 5..8).
  x2 = x.at[s].add(3.0)
  out2 = _apply(router, variables, x2, segment_ids_T=SEG)
  changed = np.any(np.asarray(out.router_probs_TxE)
                   != np.asarray(out2.router_probs_TxE), axis=-1)
  seg = np.asarray(SEG)
  assert not changed[seg != seg[s]].any()
  np.testing.assert_array_equal(changed[seg == seg[s]],
                                [False, False, True, True] if causal else True)


def test_add_expert_gate_leaves_other_experts_unchanged():
  x, _, variables, old = _sequence_routing()
  # A new row scoring +5 on segment 3's prefix means and -5 on the others'
  # (least squares): the tokens of segment 3 pick the new expert 4.
  means = _segment_means(x, SEG, causal=True)[:14]
  new_row = np.linalg.lstsq(
      means, np.where(np.asarray(SEG)[:14] == 3, 5., -5.), rcond=None)[0]
  params = sequence_gates.add_expert_gate(variables['params'], new_row)
  assert params['gates'].unbox().shape == (5, D)
  new = _apply(sequence_gates.SequenceGateRouter(5, 2), {'params': params}, x,
                                               segment_ids_T=SEG)
  np.testing.assert_array_equal(new.router_probs_TxE[:, :4],
                                old.router_probs_TxE)
  picks_new = np.any(np.asarray(new.expert_index_TxK) == 4, axis=-1)
  assert picks_new[np.asarray(SEG) == 3].all()
  assert not picks_new.all()
  unaffected = ~picks_new
  np.testing.assert_array_equal(new.expert_index_TxK[unaffected],
                                old.expert_index_TxK[unaffected])
  np.testing.assert_array_equal(new.combine_weights_TxK[unaffected],
                                old.combine_weights_TxK[unaffected])


def test_remove_expert_gate_routes_around_the_removed_expert():
  x, _, variables, old = _sequence_routing(num_experts=5)
  removed = int(old.expert_index_TxK[0, 0])  # Sequence 1's favourite.
  params = sequence_gates.remove_expert_gate(
      nn.unbox(variables['params']), removed)
  new = _apply(sequence_gates.SequenceGateRouter(4, 2), {'params': params}, x,
                                               segment_ids_T=SEG)
  old_probs = np.asarray(old.router_probs_TxE)
  keep = [e for e in range(5) if e != removed]
  np.testing.assert_array_equal(new.router_probs_TxE, old_probs[:, keep])
  # New choice = old ranking without the removed expert, renumbered.
  for t in range(14):
    ranking = [e for e in np.argsort(-old_probs[t]) if e != removed][:2]
    np.testing.assert_array_equal(new.expert_index_TxK[t],
                                  [keep.index(e) for e in ranking])
  with pytest.raises(ValueError, match='cannot remove expert 7'):
    sequence_gates.remove_expert_gate(params, 7)
  with pytest.raises(ValueError, match='expected'):
    sequence_gates.add_expert_gate(params, np.zeros(D + 1))


# ------------------------------------------------------------ partition masking


def test_partition_mask_values():
  mask = np.asarray(layout.partition_expert_mask(jnp.array([0, 2, 1, -1]),
                                                  3, 2))
  expected = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1],
                       [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('kind, kwargs', [
    ('token_topk', dict(top_k=2)), ('expert_choice', dict(capacity_factor=2.)),
    ('hash', dict(vocab_size=500, top_k=2)), ('sequence_gate', dict(top_k=2)),
])
def test_routing_never_leaves_the_token_partition(kind, kwargs):
  p, ep, t = 4, 3, 512
  ks = jax.random.split(jax.random.PRNGKey(12), 4)
  x = 3 * jax.random.normal(ks[0], (t, D))
  pid = jax.random.randint(ks[1], (t,), 0, p)
  ids = jax.random.randint(ks[2], (t,), 0, 500)
  seg = jnp.arange(t) // 4 + 1
  pid = pid[(seg - 1) * 4]  # One partition per sequence.
  mask = layout.partition_expert_mask(pid, p, ep)
  router = router_registry.make_router(kind, num_experts=p * ep, **kwargs)
  _, out = _init_apply(router, x, token_ids_T=ids, segment_ids_T=seg,
                       expert_mask_TxE=mask)
  routed = np.asarray(out.combine_weights_TxK) != 0
  owner = np.asarray(out.expert_index_TxK) // ep
  assert routed.any(axis=-1).mean() > 0.3
  assert np.all(owner[routed] == np.broadcast_to(
      np.asarray(pid)[:, None], owner.shape)[routed])


# ------------------------------------------------------------------ bad input


def test_make_router_kinds_and_bad_input():
  router = router_registry.make_router('hash', num_experts=2, vocab_size=9)
  assert isinstance(router, routing.HashRouter)
  with pytest.raises(ValueError, match="'switch'.*allowed"):
    router_registry.make_router('switch', num_experts=2)
  with pytest.raises(ValueError, match='top_k=5 exceeds num_experts=4'):
    routing.TokenTopKRouter(num_experts=4, top_k=5)
  with pytest.raises(ValueError, match='top_k=3 exceeds num_experts=2'):
    router_registry.make_router('sequence_gate', num_experts=2, top_k=3)
  with pytest.raises(ValueError, match=r'capacity_factor=0.0.*allowed: > 0'):
    routing.ExpertChoiceRouter(num_experts=4, capacity_factor=0.0)
  with pytest.raises(ValueError, match=r'capacity_factor=-1.*allowed'):
    router_registry.make_router(
        'expert_choice', num_experts=4, capacity_factor=-1)
  with pytest.raises(ValueError, match='jitter_noise=1.5'):
    routing.TokenTopKRouter(num_experts=4, top_k=1, jitter_noise=1.5)
  with pytest.raises(ValueError, match='experts_per_partition'):
    layout.partition_expert_mask(jnp.zeros(3, jnp.int32), 2, 0)
