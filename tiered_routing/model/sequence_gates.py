"""Expert-owned sequence gates: a router whose experts can be added or removed.

`SequenceGateRouter` scores every token with one sigmoid gate per expert,
each a function of its own gate row only (as in the expert-owned gates of
DEMix-style models, Gururangan et al. 2022), so appending a row for a new
expert or deleting one (`add_expert_gate`, `remove_expert_gate`) leaves the
other experts' scores unchanged. A token is scored on the mean activation of
its sequence (packed segment) up to and including itself: a language model
must not route token t on tokens it has yet to predict. It follows the
routers' per-token contract (`routing.RouterOutput`); `related.expert_gates`
grows and shrinks whole models with it.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import routing


def _segmented_add(left, right):
  """Associative op of a segmented sum: a start flag resets the running sum."""
  start_l, sum_l = left
  start_r, sum_r = right
  return start_l | start_r, jnp.where(start_r[..., None], sum_r, sum_l + sum_r)


def segment_mean(v_TxX: jax.Array, segment_ids_T: jax.Array, *,
                 causal: bool = True) -> jax.Array:
  """Per token, the mean of v over its segment: its prefix, or all of it.

  Row t of the result is the mean of v_TxX[s] over the tokens s with
  segment_ids_T[s] == segment_ids_T[t], restricted to s <= t when causal.
  A segment is the set of tokens sharing an id, in position order, so any
  id layout works (contiguous runs as in packed rows, or not; ids of any
  size): tokens are stably sorted by id, summed with a segmented scan and
  put back. Each sum only ever adds the tokens it averages, so a causal row
  depends on no later token and no other segment, not even by rounding.

  Args:
    v_TxX: float values per token.
    segment_ids_T: int segment ids (0 = padding is a segment like any other;
      callers mask it).
    causal: prefix mean (True) or whole-segment mean (False, non-causal).

  Returns:
    float [T, X], like v_TxX.
  """
  num_tokens = v_TxX.shape[0]
  t_T = jnp.arange(num_tokens)
  order_T = jnp.argsort(segment_ids_T, stable=True)
  seg_T = segment_ids_T[order_T]
  start_T = jnp.concatenate([jnp.ones((1,), jnp.bool_),
                             seg_T[1:] != seg_T[:-1]])
  _, sum_TxX = jax.lax.associative_scan(_segmented_add,
                                        (start_T, v_TxX[order_T]))
  first_T = jax.lax.cummax(jnp.where(start_T, t_T, 0))
  last_T = t_T
  if not causal:  # Every token takes the sum at its segment's last token.
    end_T = jnp.concatenate([start_T[1:], jnp.ones((1,), jnp.bool_)])
    last_T = jax.lax.cummin(jnp.where(end_T, t_T, num_tokens - 1),
                            reverse=True)
    sum_TxX = sum_TxX[last_T]
  count_T = (last_T - first_T + 1).astype(v_TxX.dtype)
  inverse_T = jnp.zeros_like(order_T).at[order_T].set(t_T)
  return (sum_TxX / count_T[:, None])[inverse_T]


class SequenceGateRouter(nn.Module):
  """Sequence-level routing with expert-owned sigmoid gates; causal.

  Token t of a sequence (one segment id within the group; 0 = padding,
  routed nowhere) is represented by h_t, the mean of the sequence's token
  activations at positions <= t. Expert e owns one gate row g_e ([E, D]
  param 'gates') and scores s_e(t) = sigmoid(g_e . h_t); token t goes to its
  top_k experts, weighted by their scores renormalized over the chosen k.
  Why the prefix: a language model predicts token t + 1 from tokens <= t, so
  routing t on the whole sequence's mean would let it read the tokens it is
  scored on through its experts, and its loss would be optimistic. DEMix
  (Gururangan et al. 2022) routes whole documents only by their known domain
  label, and at test time weighs experts by a posterior computed from the
  preceding tokens alone; the prefix mean is the content-based analogue, and
  it approaches the whole-sequence mean as the sequence grows.

  Because g_e . h_t is linear in h_t, the mean is taken over the per-token
  logits x_s . g_e (same value up to rounding, over E columns instead of
  D). Either way each score depends only on its own row, so appending a row
  (a new expert) or deleting one leaves the other experts' scores
  unchanged; see `add_expert_gate` / `remove_expert_gate`. Any segment id
  layout is handled (`segment_mean`). Groups are routed independently: when
  a row is split over several groups (group_size below the row length), a
  sequence is averaged per group, still causally. load_balance_loss is
  Switch's loss on the scores normalized per token; z_loss is 0 (no
  softmax).

  Attributes:
    num_experts: E.
    top_k: experts per token, 1 <= top_k <= E.
    causal: True = prefix mean (the default, and the only setting the
      router registry, hence `DecoderConfig` and the gin files, builds).
      False = the whole-segment mean of earlier versions: NOT causal (token
      t's experts depend on later tokens of its segment); for analysing
      complete sequences, never for language-model training or evaluation.
  """
  num_experts: int
  top_k: int
  causal: bool = True

  def __post_init__(self):
    routing.check_top_k(self.top_k, self.num_experts)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TxD, *, token_ids_T=None, segment_ids_T=None,
               expert_mask_TxE=None,
               deterministic=True) -> routing.RouterOutput:
    del token_ids_T, deterministic
    num_tokens, dim = x_TxD.shape
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal',
                                            in_axis=-1, out_axis=-2)
    gates_ExD = self.param(
        'gates', nn.with_logical_partitioning(init, ('unmodeled', 'embed')),
        (self.num_experts, dim), jnp.float32)
    if segment_ids_T is None:
      segment_ids_T = jnp.ones((num_tokens,), jnp.int32)
    token_logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), gates_ExD.T,
                               precision=jax.lax.Precision.HIGHEST)
    logits_TxE = segment_mean(token_logits_TxE, segment_ids_T,
                              causal=self.causal)
    allowed_TxE = routing.allowed_mask(num_tokens, self.num_experts,
                                       expert_mask_TxE, segment_ids_T)
    return _top_k_of_scores(logits_TxE, allowed_TxE, self.top_k)


def _top_k_of_scores(logits_TxE, allowed_TxE, top_k) -> routing.RouterOutput:
  """Routes every token to its top_k allowed experts by sigmoid score."""
  scores_TxE = jax.nn.sigmoid(logits_TxE) * allowed_TxE
  top_TxK, index_TxK = jax.lax.top_k(
      jnp.where(allowed_TxE, scores_TxE, -1.0), top_k)
  top_TxK = jnp.maximum(top_TxK, 0.0)
  weights_TxK = routing.safe_normalize(top_TxK)
  norm_probs_TxE = routing.safe_normalize(scores_TxE)
  return routing.router_output(
      index_TxK, weights_TxK, scores_TxE,
      jnp.where(allowed_TxE, logits_TxE, routing.MASKED_LOGIT),
      routing.load_balance_loss(norm_probs_TxE, index_TxK, weights_TxK,
                                allowed_TxE))


def _map_gates(params: Mapping[str, Any], fn) -> dict[str, Any]:
  """Applies fn to the (possibly logically boxed) 'gates' array of params."""
  if 'gates' not in params:
    raise ValueError('expected a SequenceGateRouter param dict with key '
                     f'"gates"; got keys {sorted(params)}.')
  gates = params['gates']
  boxed = isinstance(gates, nn.meta.AxisMetadata)
  new = fn(gates.unbox() if boxed else gates)
  return {**params, 'gates': gates.replace_boxed(new) if boxed else new}


def add_expert_gate(params: Mapping[str, Any], new_row_D) -> dict[str, Any]:
  """Returns router params with a gate row appended (new expert index E).

  The module must then be built with num_experts + 1 (and the new expert's
  weights appended). Existing experts' scores are unchanged.
  """
  def append(gates_ExD):
    row = jnp.asarray(new_row_D, gates_ExD.dtype)
    if row.shape != gates_ExD.shape[1:]:
      raise ValueError(f'new_row_D has shape {row.shape}; expected '
                       f'{gates_ExD.shape[1:]}.')
    return jnp.concatenate([gates_ExD, row[None]], axis=0)
  return _map_gates(params, append)


def remove_expert_gate(params: Mapping[str, Any], e: int) -> dict[str, Any]:
  """Returns router params without gate row e; experts above e shift down.

  Tokens that chose e fall back to their next-best experts; the module must
  be built with num_experts - 1 and expert e's weights removed likewise.
  """
  def drop(gates_ExD):
    num_experts = gates_ExD.shape[0]
    if not isinstance(e, int) or not 0 <= e < num_experts or num_experts < 2:
      raise ValueError(f'cannot remove expert {e!r} of {num_experts}; allowed: '
                       f'an int in [0, {num_experts}) with >= 2 experts.')
    return jnp.concatenate([gates_ExD[:e], gates_ExD[e + 1:]], axis=0)
  return _map_gates(params, drop)
