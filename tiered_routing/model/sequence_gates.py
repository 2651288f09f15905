"""Expert-owned sequence gates: a router whose experts can be added or removed.

`SequenceGateRouter` scores every sequence with one sigmoid gate per expert,
each a function of its own gate row only (as in the expert-owned gates of
DEMix-style models, Gururangan et al. 2022), so appending a row for a new
expert or deleting one (`add_expert_gate`, `remove_expert_gate`) leaves the
other experts' scores unchanged. It follows the routers' per-token contract
(`routing.RouterOutput`); `related.expert_gates` grows and shrinks whole
models with it.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import routing


class SequenceGateRouter(nn.Module):
  """Sequence-level routing with expert-owned sigmoid gates.

  A sequence (one segment id within the group; 0 = padding, routed nowhere)
  is represented by the mean of its token activations h. Expert e owns one
  gate row g_e ([E, D] param 'gates') and scores s_e = sigmoid(g_e . h). All
  tokens of the sequence go to its top_k experts, weighted by their scores
  renormalized over the chosen k. Because each score depends only on its own
  row, appending a row (a new expert) or deleting one leaves the other
  experts' scores unchanged; see `add_expert_gate` / `remove_expert_gate`.
  load_balance_loss is Switch's loss on the scores normalized per token
  (token-weighted, so long sequences count more); z_loss is 0 (no softmax).

  Segment ids must lie in [0, T] (packed ids 1..n do).
  """
  num_experts: int
  top_k: int

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
    x_TxD = x_TxD.astype(jnp.float32)
    seg_sum_ZxD = jax.ops.segment_sum(x_TxD, segment_ids_T, num_tokens + 1)
    seg_len_Z = jax.ops.segment_sum(jnp.ones((num_tokens,), jnp.float32),
                                    segment_ids_T, num_tokens + 1)
    h_ZxD = seg_sum_ZxD / jnp.maximum(seg_len_Z, 1.0)[:, None]
    seq_logits_ZxE = jnp.dot(h_ZxD, gates_ExD.T,
                             precision=jax.lax.Precision.HIGHEST)
    logits_TxE = seq_logits_ZxE[segment_ids_T]
    allowed_TxE = routing.allowed_mask(num_tokens, self.num_experts,
                                       expert_mask_TxE, segment_ids_T)
    scores_TxE = jax.nn.sigmoid(logits_TxE) * allowed_TxE
    top_TxK, index_TxK = jax.lax.top_k(
        jnp.where(allowed_TxE, scores_TxE, -1.0), self.top_k)
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

  Sequences that chose e fall back to their next-best experts; the module must
  be built with num_experts - 1 and expert e's weights removed likewise.
  """
  def drop(gates_ExD):
    num_experts = gates_ExD.shape[0]
    if not isinstance(e, int) or not 0 <= e < num_experts or num_experts < 2:
      raise ValueError(f'cannot remove expert {e!r} of {num_experts}; allowed: '
                       f'an int in [0, {num_experts}) with >= 2 experts.')
    return jnp.concatenate([gates_ExD[:e], gates_ExD[e + 1:]], axis=0)
  return _map_gates(params, drop)
