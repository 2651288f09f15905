"""Token -> expert dispatch, expert feed-forward and combine for one group.

`moe_mlp` computes y_t = sum_k w_tk * FFN_{e_tk}(x_t) for a `RouterOutput`,
with FFN_e(x) = act(x @ wi_e [* x @ wi_gate_e]) @ wo_e. Implementations:

  * 'einsum': GShard / T5X capacity dispatch. One-hot dispatch and combine
    tensors [T, E, C] move tokens into per-expert buffers [E, C, D] by matmul.
    Simple and shardable; memory and FLOPs grow as T^2 * K * capacity_factor.
  * 'sort_gather': the same capacity semantics, but slots are sorted by
    expert and the [E, C, D] buffers are filled by gathers (no [T, E, C]).
  * 'ragged': dropless. Token slots sorted by expert feed
    `jax.lax.ragged_dot` (grouped matmul; MegaBlocks, Gale et al. 2022).
  * 'reference': naive dropless loop over experts; the test oracle.
  * 'auto': 'ragged' on TPU/GPU; on CPU the faster capacity implementation
    (measured: see `_CPU_AUTO_IMPL`).

Capacity (einsum, sort_gather): C = ceil(capacity_factor * T * K / E), at
least 1, unless `capacity` is given. Slots with combine weight 0 are ignored
(no capacity, no gradient). Priority is GShard's: all first choices (k = 0)
in token order, then all second choices in token order, and so on; a slot
that finds its expert full is dropped (contributes 0). For K = 1 this is
plain token order: earlier tokens get capacity first.

Precision: expert matmuls run in the input dtype with float32 accumulation;
activations and the weighted combine are float32; the output has x's dtype.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from tiered_routing.model.routing import RouterOutput

IMPLS = ('einsum', 'sort_gather', 'ragged', 'auto', 'reference')
# scripts/bench_moe.py on a 2-core CPU (docs/performance.md): sort_gather was
# the fastest in every case; at E=32, K=2, T=8192 (D=256, F=512, capacity
# 1.25, forward+backward) it costs 1.17x a dense FFN of the same active
# FLOPs, einsum 3.4x (its [T*K, E, C] one-hot tensors grow quadratically per
# group) and ragged 5.0x (no fast CPU ragged_dot).
_CPU_AUTO_IMPL = 'sort_gather'
_ACCEL_BACKENDS = ('tpu', 'gpu', 'cuda', 'rocm')
_F32 = jnp.float32


@flax.struct.dataclass
class DispatchStats:
  """Routing statistics of one group."""
  dropped_fraction: jax.Array      # fraction of non-zero-weight slots dropped
  tokens_per_expert_E: jax.Array   # float32 routed slots per expert (pre-cap)


def expert_capacity(num_tokens: int, num_slots: int, num_experts: int,
                    capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * K / E), at least 1."""
  return max(1, math.ceil(capacity_factor * num_tokens * num_slots /
                          num_experts))


def resolve_impl(impl: str) -> str:
  """Validates impl and maps 'auto' to a concrete implementation."""
  if impl not in IMPLS:
    raise ValueError(f'unknown dispatch impl {impl!r}; allowed: {IMPLS}.')
  if impl != 'auto':
    return impl
  if jax.default_backend() in _ACCEL_BACKENDS:
    return 'ragged'
  return _CPU_AUTO_IMPL


def _validate(x_TxD, route, wi_ExDxF, wo_ExFxD, wi_gate_ExDxF,
              capacity_factor, capacity):
  if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
    raise ValueError(f'capacity_factor={capacity_factor!r}; allowed: > 0.')
  if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
    raise ValueError(f'capacity={capacity!r}; allowed: None or an int >= 1.')
  if x_TxD.ndim != 2:
    raise ValueError(f'x_TxD must be [T, D] (one group); got {x_TxD.shape}.')
  (t, d), (e, _, f) = x_TxD.shape, wi_ExDxF.shape
  slots = route.expert_index_TxK.shape
  if len(slots) != 2 or slots[0] != t or route.combine_weights_TxK.shape != (
      slots):
    raise ValueError(f'route slots {slots} / {route.combine_weights_TxK.shape}'
                     f' do not match [T={t}, K].')
  if wi_ExDxF.shape != (e, d, f) or wo_ExFxD.shape != (e, f, d):
    raise ValueError(f'expert weights wi {wi_ExDxF.shape}, wo '
                     f'{wo_ExFxD.shape} do not match D={d}: need [E, {d}, F] '
                     f'and [E, F, {d}].')
  if wi_gate_ExDxF is not None and wi_gate_ExDxF.shape != wi_ExDxF.shape:
    raise ValueError(f'wi_gate_ExDxF {wi_gate_ExDxF.shape} != wi '
                     f'{wi_ExDxF.shape}.')


def _expert_ffn(x_ExCxD, weights, activation):
  """Batched expert FFN on [E, C, D] buffers; returns float32 [E, C, D]."""
  dtype = x_ExCxD.dtype
  wi, wo = weights[0].astype(dtype), weights[1].astype(dtype)
  h_ExCxF = jnp.einsum('ecd,edf->ecf', x_ExCxD, wi, preferred_element_type=_F32)
  a_ExCxF = activation(h_ExCxF)
  if len(weights) == 3:
    a_ExCxF = a_ExCxF * jnp.einsum('ecd,edf->ecf', x_ExCxD,
                                   weights[2].astype(dtype),
                                   preferred_element_type=_F32)
  return jnp.einsum('ecf,efd->ecd', a_ExCxF.astype(dtype), wo,
                    preferred_element_type=_F32)


def _reference(x_TxD, idx_TxK, cw_TxK, weights, activation):
  """Every expert on every token, weighted by its combine weight (dropless)."""
  y_TxD = jnp.zeros(x_TxD.shape, _F32)
  for e in range(weights[0].shape[0]):
    w_T = jnp.sum(jnp.where(idx_TxK == e, cw_TxK, 0.0), axis=-1)
    out_TxD = _expert_ffn(x_TxD[None], [w[e:e + 1] for w in weights],
                          activation)[0]
    y_TxD = y_TxD + w_T[:, None] * out_TxD
  return y_TxD


def _onehot_positions(idx_TxK, valid_TxK, num_experts):
  """Slot positions in their expert's buffer by cumsum (GShard priority)."""
  mask_KxTxE = jax.nn.one_hot(idx_TxK.T, num_experts, dtype=jnp.int32
                              ) * valid_TxK.T[..., None]
  k, t, e = mask_KxTxE.shape
  cum_KxTxE = jnp.cumsum(mask_KxTxE.reshape(k * t, e), axis=0).reshape(k, t, e)
  return (jnp.sum(cum_KxTxE * mask_KxTxE, axis=-1) - 1).T


def _einsum_moe(x_TxD, idx_TxK, cw_TxK, keep_TxK, pos_TxK, capacity, weights,
                activation):
  num_experts = weights[0].shape[0]
  onehot_e_TxKxE = jax.nn.one_hot(idx_TxK, num_experts, dtype=_F32)
  # Position `capacity` is out of range, so dropped slots get a zero row.
  onehot_c_TxKxC = jax.nn.one_hot(jnp.where(keep_TxK, pos_TxK, capacity),
                                  capacity, dtype=_F32)
  dispatch_TxExC = jnp.einsum('tke,tkc->tec', onehot_e_TxKxE, onehot_c_TxKxC)
  x_ExCxD = jnp.einsum('tec,td->ecd', dispatch_TxExC.astype(x_TxD.dtype),
                       x_TxD)
  out_ExCxD = _expert_ffn(x_ExCxD, weights, activation)
  combine_TxExC = jnp.einsum('tk,tke,tkc->tec', cw_TxK * keep_TxK,
                             onehot_e_TxKxE, onehot_c_TxKxC)
  return jnp.einsum('tec,ecd->td', combine_TxExC, out_ExCxD)


def _sort_slots(idx_TxK, valid_TxK, num_experts, k_major):
  """Stable sort of slots by expert; invalid slots go last (key E).

  Returns (order_R, counts_E): order_R lists slot ids s (k * T + t when
  k_major, else t * K + k) grouped by expert, original order within one.
  """
  if k_major:
    idx_TxK, valid_TxK = idx_TxK.T, valid_TxK.T
  key_R = jnp.where(valid_TxK, idx_TxK, num_experts).reshape(-1)
  order_R = jnp.argsort(key_R, stable=True)
  counts_E = jnp.zeros((num_experts,), jnp.int32).at[key_R].add(1, mode='drop')
  return order_R, counts_E


def _sort_gather_moe(x_TxD, idx_TxK, cw_TxK, valid_TxK, capacity, weights,
                     activation):
  """Capacity dispatch by sort + gather; returns (y, keep_TxK)."""
  (t, k), e, c = idx_TxK.shape, weights[0].shape[0], capacity
  order_R, counts_E = _sort_slots(idx_TxK, valid_TxK, e, k_major=True)
  starts_E = jnp.cumsum(counts_E) - counts_E
  # Buffer slot (e, c) holds the c-th slot routed to e, if there is one.
  src_ExC = jnp.minimum(starts_E[:, None] + jnp.arange(c), t * k - 1)
  filled_ExC = jnp.arange(c)[None, :] < counts_E[:, None]
  token_ExC = jnp.where(filled_ExC, order_R[src_ExC] % t, t)
  x_ExCxD = jnp.take(x_TxD, token_ExC, axis=0, mode='fill', fill_value=0)
  out_ECxD = _expert_ffn(x_ExCxD, weights, activation).reshape(e * c, -1)
  # Position of every slot within its expert, back in (t, k) layout.
  sorted_expert_R = jnp.minimum(idx_TxK.T.reshape(-1)[order_R], e - 1)
  rank_R = jnp.arange(t * k) - starts_E[sorted_expert_R]
  pos_TxK = jnp.zeros((t * k,), jnp.int32).at[order_R].set(rank_R).reshape(
      k, t).T
  keep_TxK = valid_TxK & (pos_TxK < c)
  dest_TxK = jnp.where(keep_TxK, idx_TxK * c + pos_TxK, e * c)
  out_TxKxD = jnp.take(out_ECxD, dest_TxK, axis=0, mode='fill', fill_value=0)
  return jnp.einsum('tk,tkd->td', cw_TxK * keep_TxK, out_TxKxD), keep_TxK


def moe_mlp(x_TxD, route: RouterOutput, wi_ExDxF, wo_ExFxD, *, impl: str,
            capacity_factor: float = 1.25, activation=jax.nn.gelu,
            wi_gate_ExDxF=None, capacity: int | None = None
            ) -> tuple[jax.Array, DispatchStats]:
  """Mixture-of-experts feed-forward of one group of T tokens.

  Args:
    x_TxD: token activations.
    route: the router's output for these tokens.
    wi_ExDxF, wo_ExFxD: expert weights.
    impl: one of IMPLS (see module docstring).
    capacity_factor: > 0; sets C for the capacity implementations.
    activation: elementwise nonlinearity.
    wi_gate_ExDxF: optional gate weights (GLU variant, Shazeer 2020).
    capacity: optional explicit per-expert capacity overriding
      capacity_factor (e.g. expert-choice routing, where it is known).

  Returns:
    (y_TxD in x's dtype, DispatchStats).
  """
  impl = resolve_impl(impl)
  _validate(x_TxD, route, wi_ExDxF, wo_ExFxD, wi_gate_ExDxF, capacity_factor,
            capacity)
  weights = (wi_ExDxF, wo_ExFxD) + (
      () if wi_gate_ExDxF is None else (wi_gate_ExDxF,))
  idx_TxK = route.expert_index_TxK.astype(jnp.int32)
  cw_TxK = route.combine_weights_TxK.astype(_F32)
  valid_TxK = cw_TxK != 0
  # jnp.where (not a product) so ignored slots also get no gradient.
  cw_TxK = jnp.where(valid_TxK, cw_TxK, 0.0)
  (num_tokens, k), num_experts = idx_TxK.shape, wi_ExDxF.shape[0]
  tokens_per_expert_E = jnp.zeros((num_experts,), _F32).at[idx_TxK].add(
      valid_TxK.astype(_F32))
  keep_TxK = valid_TxK
  if impl == 'reference':
    y_TxD = _reference(x_TxD, idx_TxK, cw_TxK, weights, activation)
  elif impl == 'ragged':
    y_TxD = _ragged_op(activation)(x_TxD, idx_TxK, cw_TxK, weights)
  else:
    c = capacity or expert_capacity(num_tokens, k, num_experts,
                                    capacity_factor)
    if impl == 'einsum':
      pos_TxK = _onehot_positions(idx_TxK, valid_TxK, num_experts)
      keep_TxK = valid_TxK & (pos_TxK < c)
      y_TxD = _einsum_moe(x_TxD, idx_TxK, cw_TxK, keep_TxK, pos_TxK, c,
                          weights, activation)
    else:
      y_TxD, keep_TxK = _sort_gather_moe(x_TxD, idx_TxK, cw_TxK, valid_TxK,
                                         c, weights, activation)
  num_valid = valid_TxK.sum()
  dropped = (valid_TxK & ~keep_TxK).sum() / jnp.maximum(num_valid, 1)
  return y_TxD.astype(x_TxD.dtype), DispatchStats(
      dropped_fraction=dropped.astype(_F32),
      tokens_per_expert_E=tokens_per_expert_E)


# ----------------------------------------------------------------------------
# Dropless ragged_dot implementation.
#
# jax.lax.ragged_dot cannot be vmapped with unbatched (shared) expert weights,
# which is exactly how callers map moe_mlp over groups. Dropless routing does
# not depend on the grouping, so under vmap the groups are simply flattened
# into one long token list (custom_vmap); per-group weights (e.g. vmapped
# partition-private experts) become extra experts. custom_vmap is not
# differentiable, hence the hand-written VJP around it. Under vmap with
# shared weights the backward returns the weight gradient summed over the
# mapped axis, which is what grad(vmap(f)) needs; per-example gradients
# through vmap(grad(f)) over the group axis are therefore NOT supported.
# ----------------------------------------------------------------------------


def _gmm(lhs_RxX, rhs_ExXxY, counts_E):
  return jax.lax.ragged_dot(lhs_RxX, rhs_ExXxY.astype(lhs_RxX.dtype), counts_E,
                            preferred_element_type=_F32)


def _tgmm(lhs_RxX, rhs_RxY, counts_E):
  """Per-group lhs^T @ rhs over the row groups: [E, A, B] float32."""
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(lhs_RxX, rhs_RxY.astype(lhs_RxX.dtype),
                                    counts_E, dims, preferred_element_type=_F32)


def _ragged_layout(idx_TxK, cw_TxK, num_experts):
  order_R, counts_E = _sort_slots(idx_TxK, cw_TxK != 0, num_experts,
                                  k_major=False)
  inverse_R = jnp.zeros_like(order_R).at[order_R].set(
      jnp.arange(order_R.shape[0], dtype=order_R.dtype))
  return order_R, inverse_R, counts_E, order_R // idx_TxK.shape[1]


def _ragged_fwd(activation, x_TxD, idx_TxK, cw_TxK, weights):
  """Returns y_TxD (float32) and the sorted residuals (h, gate, out)."""
  dtype, (t, k) = x_TxD.dtype, idx_TxK.shape
  order_R, inverse_R, counts_E, token_R = _ragged_layout(
      idx_TxK, cw_TxK, weights[0].shape[0])
  xs_RxD = x_TxD[token_R]
  h_RxF = _gmm(xs_RxD, weights[0], counts_E)
  g_RxF = _gmm(xs_RxD, weights[2], counts_E) if len(weights) == 3 else None
  a_RxF = activation(h_RxF) if g_RxF is None else activation(h_RxF) * g_RxF
  out_RxD = _gmm(a_RxF.astype(dtype), weights[1], counts_E)
  out_TxKxD = out_RxD[inverse_R].reshape(t, k, -1)
  y_TxD = jnp.einsum('tk,tkd->td', cw_TxK, out_TxKxD)
  return y_TxD, (h_RxF, g_RxF, out_RxD)


def _ragged_bwd(activation, x_TxD, idx_TxK, cw_TxK, weights, res, dy_TxD):
  """Hand-written VJP of _ragged_fwd w.r.t. (x, cw, weights)."""
  dtype, (t, k) = x_TxD.dtype, idx_TxK.shape
  h_RxF, g_RxF, out_RxD = res
  order_R, inverse_R, counts_E, token_R = _ragged_layout(
      idx_TxK, cw_TxK, weights[0].shape[0])
  xs_RxD = x_TxD[token_R]
  dy_RxD = dy_TxD.astype(_F32)[token_R]
  dcw_TxK = jnp.sum(dy_RxD * out_RxD, -1)[inverse_R].reshape(t, k)
  dout_RxD = (cw_TxK.reshape(-1)[order_R][:, None] * dy_RxD).astype(dtype)
  act_RxF, act_vjp = jax.vjp(activation, h_RxF)
  a_RxF = act_RxF if g_RxF is None else act_RxF * g_RxF
  da_RxF = _gmm(dout_RxD, jnp.swapaxes(weights[1], 1, 2), counts_E)
  dwo = _tgmm(a_RxF.astype(dtype), dout_RxD, counts_E)
  dh_RxF = act_vjp(da_RxF if g_RxF is None else da_RxF * g_RxF)[0]
  dxs_RxD = _gmm(dh_RxF.astype(dtype), jnp.swapaxes(weights[0], 1, 2),
                 counts_E)
  dweights = [_tgmm(xs_RxD, dh_RxF.astype(dtype), counts_E), dwo]
  if g_RxF is not None:
    dg_RxF = (da_RxF * act_RxF).astype(dtype)
    dxs_RxD += _gmm(dg_RxF, jnp.swapaxes(weights[2], 1, 2), counts_E)
    dweights.append(_tgmm(xs_RxD, dg_RxF, counts_E))
  dx_TxD = jnp.zeros(x_TxD.shape, _F32).at[token_R].add(dxs_RxD)
  dweights = tuple(dw.astype(w.dtype) for dw, w in zip(dweights, weights))
  return dx_TxD.astype(dtype), jnp.where(cw_TxK != 0, dcw_TxK, 0.0), dweights


def _merge_mapped_axis(axis_size, in_batched, per_token, weights):
  """Folds a vmapped axis into tokens (and into experts for mapped weights).

  Args:
    axis_size: size A of the mapped axis.
    in_batched: (per_token flags, weights flags).
    per_token: tuple of arrays [A?, T, ...]; the second must be idx_TxK.
    weights: tuple of expert weights [A?, E, ...].

  Returns:
    (per_token flattened to [A*T, ...], weights, weights_mapped).
  """
  def batch(a, is_batched):
    return a if is_batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
  tok_flags, w_flags = in_batched
  per_token = [batch(a, b) for a, b in zip(per_token, tok_flags)]
  weights_mapped = any(w_flags)
  if weights_mapped:
    weights = [batch(w, b) for w, b in zip(weights, w_flags)]
    e = weights[0].shape[1]
    per_token[1] = per_token[1] + (jnp.arange(axis_size) * e)[:, None, None]
    weights = tuple(w.reshape((axis_size * e,) + w.shape[2:])
                    for w in weights)
  per_token = [a.reshape((-1,) + a.shape[2:]) for a in per_token]
  return per_token, weights, weights_mapped


def _split(a, axis_size):
  return a.reshape((axis_size, -1) + a.shape[1:])


@functools.lru_cache(maxsize=64)
def _ragged_op(activation):
  """Builds the differentiable, vmappable ragged moe op for one activation."""

  @custom_vmap
  def fwd(x, idx, cw, weights):
    return _ragged_fwd(activation, x, idx, cw, weights)

  @fwd.def_vmap
  def fwd_rule(axis_size, in_batched, x, idx, cw, weights):
    tok_flags = tuple(in_batched[:3])
    (x, idx, cw), weights, _ = _merge_mapped_axis(
        axis_size, (tok_flags, in_batched[3]), [x, idx, cw], weights)
    y, res = fwd(x, idx, cw, weights)
    out = jax.tree.map(lambda a: _split(a, axis_size), (y, res))
    return out, jax.tree.map(lambda _: True, out)

  @custom_vmap
  def bwd(x, idx, cw, weights, res, dy):
    return _ragged_bwd(activation, x, idx, cw, weights, res, dy)

  @bwd.def_vmap
  def bwd_rule(axis_size, in_batched, x, idx, cw, weights, res, dy):
    res_leaves, res_def = jax.tree.flatten(res)
    res_flags = jax.tree.leaves(in_batched[4])
    tok_flags = tuple(in_batched[:3]) + tuple(res_flags) + (in_batched[5],)
    merged, weights, mapped = _merge_mapped_axis(
        axis_size, (tok_flags, in_batched[3]),
        [x, idx, cw, *res_leaves, dy], weights)
    res = jax.tree.unflatten(res_def, merged[3:-1])
    dx, dcw, dw = bwd(*merged[:3], weights, res, merged[-1])
    if mapped:
      dw = tuple(w.reshape((axis_size, -1) + w.shape[1:]) for w in dw)
    out = (_split(dx, axis_size), _split(dcw, axis_size), dw)
    return out, (True, True, tuple(mapped for _ in dw))

  @jax.custom_vjp
  def op(x, idx, cw, weights):
    return fwd(x, idx, cw, weights)[0]

  def op_fwd(x, idx, cw, weights):
    y, res = fwd(x, idx, cw, weights)
    return y, (x, idx, cw, weights, res)

  def op_bwd(saved, dy):
    x, idx, cw, weights, res = saved
    dx, dcw, dw = bwd(x, idx, cw, weights, res, dy)
    return dx, None, dcw, dw

  op.defvjp(op_fwd, op_bwd)
  return op
