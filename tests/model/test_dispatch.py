"""dispatch.moe_mlp: every implementation against the naive per-expert loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import dispatch
from tiered_routing.model.routing import RouterOutput

T, D, F, E, K = 24, 8, 16, 4, 2
FAST_IMPLS = ('einsum', 'sort_gather', 'ragged')


@pytest.fixture(autouse=True, scope='module')
def _fast_compile():
  """These tests compile many tiny programs; skip XLA's costly optimizations.

  Optimization level changes speed, not results; restored afterwards.
  """
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)
# Jitted once per static configuration: eager op-by-op dispatch is slower.
_moe_mlp = jax.jit(dispatch.moe_mlp, static_argnames=(
    'impl', 'capacity_factor', 'activation', 'capacity'))


def _route(idx_TxK, cw_TxK) -> RouterOutput:
  t, e = idx_TxK.shape[0], E
  zero = jnp.zeros((), jnp.float32)
  return RouterOutput(
      expert_index_TxK=jnp.asarray(idx_TxK, jnp.int32),
      combine_weights_TxK=jnp.asarray(cw_TxK, jnp.float32),
      router_probs_TxE=jnp.zeros((t, e)), router_logits_TxE=jnp.zeros((t, e)),
      load_balance_loss=zero, z_loss=zero)


def _problem(seed=0, t=T, gated=False):
  """Random x, weights and a top-k route with one zero-weight slot."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(ks[0], (t, D))
  wi = jax.random.normal(ks[1], (E, D, F)) / np.sqrt(D)
  wo = jax.random.normal(ks[2], (E, F, D)) / np.sqrt(F)
  wg = jax.random.normal(ks[3], (E, D, F)) / np.sqrt(D) if gated else None
  probs = jax.nn.softmax(2 * jax.random.normal(ks[4], (t, E)))
  top_p, idx = jax.lax.top_k(probs, K)
  cw = (top_p / top_p.sum(-1, keepdims=True)).at[1, 1].set(0.0)
  return x, idx, cw, wi, wo, wg


def _loss_and_grads(impl, x, idx, cw, wi, wo, wg, **kwargs):
  """Value and grads of a non-linear function of y w.r.t. x, cw and weights."""
  def loss(x, cw, wi, wo, wg):
    y, stats = dispatch.moe_mlp(x, _route(idx, cw), wi, wo, impl=impl,
                                wi_gate_ExDxF=wg, **kwargs)
    return jnp.sum(jnp.sin(y) * y), (y, stats)
  argnums = (0, 1, 2, 3) + ((4,) if wg is not None else ())
  fn = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))
  (_, (y, stats)), grads = fn(x, cw, wi, wo, wg)
  return y, stats, grads


@functools.lru_cache(maxsize=None)
def _reference_result(seed, gated):
  return _loss_and_grads('reference', *_problem(seed=seed, gated=gated))


@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_matches_reference_when_nothing_overflows(impl, gated):
  args = _problem(seed=1, gated=gated)
  y_ref, _, g_ref = _reference_result(1, gated)
  # capacity_factor E/K: C = T, so no expert can overflow.
  y, stats, grads = _loss_and_grads(impl, *args, capacity_factor=E / K)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_r in zip(grads, g_ref):
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-5)
  assert float(stats.dropped_fraction) == 0.0


def test_ragged_is_dropless_at_any_capacity_factor():
  args = _problem(seed=1, gated=True)
  y_ref, _, g_ref = _reference_result(1, True)
  y, stats, grads = _loss_and_grads('ragged', *args, capacity_factor=0.01)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_r in zip(grads, g_ref):
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-5)
  assert float(stats.dropped_fraction) == 0.0


def _overflow_case():
  """T=4, K=2, E=2, C=ceil(0.5*4*2/2)=2; slot (t=1, k=1) has weight 0.

  Priority is all k=0 slots in token order, then k=1 slots:
    expert 0 queue: (t0,k0) (t1,k0) (t3,k0) (t2,k1) -> keeps t0, t1
    expert 1 queue: (t2,k0) (t0,k1) (t3,k1)         -> keeps t2, t0
  Dropped: (t3,k0), (t2,k1), (t3,k1): 3 of 7 non-zero slots.
  """
  idx = np.array([[0, 1], [0, 1], [1, 0], [0, 1]])
  cw = np.array([[0.6, 0.4], [1.0, 0.0], [0.7, 0.3], [0.5, 0.5]], np.float32)
  kept = np.array([[1, 1], [1, 0], [1, 0], [0, 0]], np.float32)
  return idx, cw, kept


@pytest.mark.parametrize('impl', ['einsum', 'sort_gather'])
def test_overflow_drops_hand_computed_slots(impl):
  idx, cw, kept = _overflow_case()
  x, _, _, wi, wo, _ = _problem(seed=3, t=4)
  y, stats = _moe_mlp(x, _route(idx, cw), wi[:2], wo[:2], impl=impl,
                              capacity_factor=0.5)
  assert float(stats.dropped_fraction) == pytest.approx(3 / 7)
  np.testing.assert_array_equal(stats.tokens_per_expert_E, [4.0, 3.0])
  # Kept slots compute exactly what the dropless oracle computes for them.
  y_ref, _ = _moe_mlp(x, _route(idx, cw * kept), wi[:2], wo[:2],
                              impl='reference')
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y[3], np.zeros(D))  # Both of t3's slots.
  # An explicit capacity gives the same answer as the equivalent factor.
  y_c, stats_c = _moe_mlp(x, _route(idx, cw), wi[:2], wo[:2],
                                  impl=impl, capacity=2)
  np.testing.assert_array_equal(y_c, y)
  assert float(stats_c.dropped_fraction) == pytest.approx(3 / 7)


def test_capacity_impls_drop_the_same_slots_on_random_routes():
  args = _problem(seed=4, t=48)
  outs = {impl: _loss_and_grads(impl, *args, capacity_factor=0.5)
          for impl in ('einsum', 'sort_gather')}
  (y_e, s_e, g_e), (y_s, s_s, g_s) = outs['einsum'], outs['sort_gather']
  assert 0.2 < float(s_e.dropped_fraction) < 0.8
  assert float(s_e.dropped_fraction) == float(s_s.dropped_fraction)
  np.testing.assert_allclose(y_e, y_s, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_e, g_s):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tokens_per_expert_counts_nonzero_slots():
  x, idx, cw, wi, wo, _ = _problem(seed=5)
  _, stats = _moe_mlp(x, _route(idx, cw), wi, wo, impl='reference')
  expected = np.zeros(E)
  np.add.at(expected, np.asarray(idx)[np.asarray(cw) != 0], 1.0)
  np.testing.assert_array_equal(stats.tokens_per_expert_E, expected)
  assert stats.tokens_per_expert_E.sum() == T * K - 1


def _group_loss(impl, x_GxTxD, idx_GxTxK, cw_GxTxK, wi, wo):
  run = functools.partial(dispatch.moe_mlp, impl=impl, capacity_factor=E / K)
  y_GxTxD, stats = jax.vmap(
      lambda x, i, c: run(x, _route(i, c), wi, wo))(x_GxTxD, idx_GxTxK,
                                                    cw_GxTxK)
  return jnp.sum(jnp.tanh(y_GxTxD)), stats


@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_vmap_over_groups_under_jit(impl):
  groups = [_problem(seed=10 + g) for g in range(3)]
  x, idx, cw = (jnp.stack([p[i] for p in groups]) for i in range(3))
  wi, wo = groups[0][3], groups[0][4]
  fn = lambda impl: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda *a: _group_loss(impl, *a), (0, 2, 3, 4), has_aux=True))(
          x, idx, cw, wi, wo)
  (v_ref, _), g_ref = fn('reference')
  (v, stats), grads = fn(impl)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  assert stats.dropped_fraction.shape == (3,)
  for g, g_r in zip(grads, g_ref):
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-5)


def test_ragged_nested_vmap_with_per_partition_experts():
  """Outer vmap maps the expert weights (partition-private experts)."""
  problems = [[_problem(seed=20 + 3 * p + g) for g in range(2)]
              for p in range(2)]
  x, idx, cw = (jnp.stack([jnp.stack([q[i] for q in row]) for row in problems])
                for i in range(3))
  wi = jnp.stack([row[0][3] for row in problems])
  wo = jnp.stack([row[0][4] for row in problems])

  def loss(impl, x, cw, wi, wo):
    per_partition = jax.vmap(lambda *a: _group_loss(impl, *a)[0])
    return jnp.sum(per_partition(x, idx, cw, wi, wo))
  grad = lambda impl: jax.jit(jax.grad(  # pylint: disable=g-long-lambda
      functools.partial(loss, impl), (0, 1, 2, 3)))(x, cw, wi, wo)
  for g, g_r in zip(grad('ragged'), grad('reference')):
    np.testing.assert_allclose(g, g_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', FAST_IMPLS + ('reference',))
def test_bfloat16_inputs(impl):
  x, idx, cw, wi, wo, wg = _problem(seed=6, gated=True)
  y32, _ = _moe_mlp(x, _route(idx, cw), wi, wo, wi_gate_ExDxF=wg,
                            impl='reference')
  bf = lambda a: a.astype(jnp.bfloat16)
  def loss(x, wi):
    y, _ = _moe_mlp(x, _route(idx, cw), wi, bf(wo),
                            wi_gate_ExDxF=bf(wg), impl=impl,
                            capacity_factor=E / K)
    return jnp.sum(y.astype(jnp.float32)), y
  (_, y), (dx, dwi) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      bf(x), bf(wi))
  assert y.dtype == jnp.bfloat16
  assert dx.dtype == jnp.bfloat16 and dwi.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=5e-2, atol=5e-2)


def test_auto_resolves_per_backend():
  expected = 'ragged' if jax.default_backend() in ('tpu', 'gpu') else (
      'sort_gather')
  assert dispatch.resolve_impl('auto') == expected
  assert dispatch.resolve_impl('einsum') == 'einsum'
  args = _problem(seed=1)
  y_ref, _, _ = _reference_result(1, False)
  y, _ = _moe_mlp(args[0], _route(args[1], args[2]), args[3],
                          args[4], impl='auto', capacity_factor=E / K)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_expert_capacity():
  assert dispatch.expert_capacity(100, 2, 8, 1.25) == 32  # ceil(31.25)
  assert dispatch.expert_capacity(4, 1, 64, 0.1) == 1


@pytest.mark.parametrize('kwargs, message', [
    (dict(impl='megablocks'), "'megablocks'"),
    (dict(impl='einsum', capacity_factor=0.0), 'capacity_factor=0.0'),
    (dict(impl='sort_gather', capacity_factor=-1.0), 'capacity_factor=-1.0'),
    (dict(impl='einsum', capacity=0), 'capacity=0'),
])
def test_bad_arguments_raise(kwargs, message):
  x, idx, cw, wi, wo, _ = _problem()
  with pytest.raises(ValueError, match=message) as err:
    dispatch.moe_mlp(x, _route(idx, cw), wi, wo, **kwargs)
  assert 'allowed' in str(err.value)


def test_shape_mismatch_raises():
  x, idx, cw, wi, wo, _ = _problem()
  with pytest.raises(ValueError, match='expert weights'):
    dispatch.moe_mlp(x, _route(idx, cw), wi, wo[:, :, :3], impl='einsum')
  with pytest.raises(ValueError, match='one group'):
    dispatch.moe_mlp(x[None], _route(idx, cw), wi, wo, impl='einsum')
