"""Mixture-of-Experts feed-forward: router -> dispatch -> experts -> combine.

Tokens are routed in *groups* (GShard, Lepikhin et al. 2020, Sec. 2.2):
capacity, load balance and expert-choice selection are all defined per group,
and groups are independent, so the router and the dispatch are vmapped over
the group axis. `group_shape` chooses groups made of whole sequences whenever
the group size allows, which keeps a sequence's tokens together for
sequence-level routing.

Parameter layout (the contract shared with `routing.py` / `dispatch.py`):
  router/...           the router's own parameters (never 'expert' in the path)
  expert/wi            [E, D, F] logical axes ('expert', 'embed', 'expert_mlp')
  expert/wi_gate       [E, D, F] (gated experts only)
  expert/wo            [E, F, D] logical axes ('expert', 'expert_mlp', 'embed')
  shared_mlp/...       optional dense expert every token uses (DeepSeekMoE,
                       Dai et al. 2024), deliberately not named 'expert'
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import dispatch as dispatch_lib
from tiered_routing.model import layers
from tiered_routing.model import router_registry

# Names of the per-layer values sown into the 'intermediates' collection.
# `losses` reads them only at '<layer path>/<name>/<i>', where `sow` puts
# them, so outputs recorded there by `capture_intermediates` do not count.
SOWN_NAMES = ("load_balance_loss", "router_z_loss", "expert_usage_E",
              "dropped_fraction", "router_entropy")


def group_shape(num_rows: int, length: int, group_size: int) -> tuple[int, int]:
  """Returns (G, S): how `num_rows` rows of `length` tokens are grouped.

  If `group_size >= length`, a group is the largest whole number of rows whose
  token count does not exceed `group_size` and that divides `num_rows`.
  Otherwise every row is split into equal chunks of the largest divisor of
  `length` not above `group_size`. Either way tokens are grouped by a plain
  reshape of the row-major [rows, length] layout.
  """
  for name, value in (("num_rows", num_rows), ("length", length),
                      ("group_size", group_size)):
    if value < 1:
      raise ValueError(f"group_shape: {name}={value} must be positive.")
  if group_size >= length:
    rows = max(r for r in range(1, min(num_rows, group_size // length) + 1)
               if num_rows % r == 0)
    return num_rows // rows, rows * length
  chunk = max(c for c in range(1, group_size + 1) if length % c == 0)
  return num_rows * (length // chunk), chunk


def routing_segment_ids(segment_ids_GxS: jax.Array, length: int) -> jax.Array:
  """Relabels segment ids so every sequence in a group has its own id.

  Packed rows reuse ids 1, 2, ... in every row, so rows grouped together
  would otherwise be merged into one "sequence" by sequence-level routers.
  New ids count segment starts within the group (a start is a row boundary
  or a change of id); padding (id 0) stays 0.
  """
  s = segment_ids_GxS.shape[-1]
  t_S = jnp.arange(s)
  prev_GxS = jnp.pad(segment_ids_GxS, ((0, 0), (1, 0)))[:, :-1]
  start_GxS = (t_S % length == 0) | (segment_ids_GxS != prev_GxS)
  labels_GxS = jnp.cumsum(start_GxS.astype(jnp.int32), axis=-1)
  return jnp.where(segment_ids_GxS > 0, labels_GxS, 0)


def _normalized_entropy(probs_TxE: jax.Array) -> jax.Array:
  """Mean of H(p)/log(E) over routed tokens: 1 = uniform, 0 = one-hot.

  Padding tokens (all probabilities 0) are left out of the mean.
  """
  e = probs_TxE.shape[-1]
  if e == 1:
    return jnp.zeros((), jnp.float32)
  safe_TxE = jnp.where(probs_TxE > 0, probs_TxE, 1.0)
  entropy_T = -jnp.sum(probs_TxE * jnp.log(safe_TxE), axis=-1)
  routed_T = jnp.sum(probs_TxE, axis=-1) > 0
  mean = jnp.sum(jnp.where(routed_T, entropy_T, 0.0)) / jnp.maximum(
      jnp.sum(routed_T), 1)
  return mean / math.log(e)


class ExpertWeights(nn.Module):
  """The stacked expert matrices; the module is named 'expert' by its user."""

  num_experts: int
  d_ff: int
  gated: bool = True
  dtype: jnp.dtype = jnp.float32

  def _kernel(self, name, shape, axes, in_axis, out_axis):
    init = layers.fan_in_init(in_axis, out_axis, batch_axis=(0,))
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, d_model: int):
    """Returns (wi_ExDxF, wo_ExFxD, wi_gate_ExDxF or None) in `dtype`."""
    e, f = self.num_experts, self.d_ff
    in_axes = ("expert", "embed", "expert_mlp")
    wi = self._kernel("wi", (e, d_model, f), in_axes, 1, 2)
    gate = (self._kernel("wi_gate", (e, d_model, f), in_axes, 1, 2)
            if self.gated else None)
    wo = self._kernel("wo", (e, f, d_model), ("expert", "expert_mlp", "embed"),
                      1, 2)
    return wi, wo, gate


class MoeFeedForward(nn.Module):
  """Routed expert feed-forward over G groups of S tokens.

  Attributes:
    num_experts: E.
    expert_d_ff: hidden size F of every expert.
    top_k: experts per token (token-choice, hash and sequence-gate routers).
    router: kind for `router_registry.make_router`.
    router_jitter: Switch multiplicative jitter (token_topk only).
    vocab_size: vocabulary size, needed by the hash router.
    dispatch: implementation for `dispatch.moe_mlp`.
    capacity_factor: capacity factor for dispatch and expert choice.
    gated: gated (GEGLU-style) experts.
    activation: name in `layers.ACTIVATIONS`.
    shared_expert_d_ff: hidden size of an always-on dense expert; 0 = none.
    dtype: activation dtype (routing is float32 regardless).
  """

  num_experts: int
  expert_d_ff: int
  top_k: int = 2
  router: str = "token_topk"
  router_jitter: float = 0.0
  vocab_size: int = 0
  dispatch: str = "auto"
  capacity_factor: float = 1.25
  gated: bool = True
  activation: str = "gelu"
  shared_expert_d_ff: int = 0
  dtype: jnp.dtype = jnp.float32

  def _make_router(self) -> nn.Module:
    return router_registry.make_router(
        self.router, num_experts=self.num_experts, name="router",
        top_k=self.top_k, jitter_noise=self.router_jitter,
        capacity_factor=self.capacity_factor, vocab_size=self.vocab_size)

  def _route(self, x_GxSxD, token_ids_GxS, segment_ids_GxS, expert_mask_GxSxE,
             deterministic):
    """Runs the router on every group; parameters are shared across groups.

    Returns:
      (RouterOutput with a leading group axis, dispatch capacity or None).
    """

    def route_group(router, x_SxD, ids_S, seg_S, mask_SxE):
      return router(x_SxD, token_ids_T=ids_S, segment_ids_T=seg_S,
                    expert_mask_TxE=mask_SxE, deterministic=deterministic)

    vmapped = nn.vmap(
        route_group, variable_axes={"params": None, "intermediates": 0},
        split_rngs={"params": False, "jitter": True}, in_axes=0, out_axes=0)
    router = self._make_router()
    route = vmapped(router, x_GxSxD, token_ids_GxS, segment_ids_GxS,
                    expert_mask_GxSxE)
    # Expert choice fills every expert to exactly its capacity; dispatching
    # with that capacity (not capacity_factor * T * K / E with K = E slots)
    # keeps the expert buffers tight and drops nothing.
    capacity = (router.capacity(x_GxSxD.shape[1])
                if self.router == "expert_choice" else None)
    return route, capacity

  def _sow_metrics(self, route, stats) -> None:
    self.sow("intermediates", "load_balance_loss",
             jnp.mean(route.load_balance_loss))
    self.sow("intermediates", "router_z_loss", jnp.mean(route.z_loss))
    counts_E = jnp.sum(stats.tokens_per_expert_E, axis=0)
    self.sow("intermediates", "expert_usage_E",
             counts_E / jnp.maximum(jnp.sum(counts_E), 1.0))
    self.sow("intermediates", "dropped_fraction",
             jnp.mean(stats.dropped_fraction))
    self.sow("intermediates", "router_entropy",
             _normalized_entropy(route.router_probs_TxE.reshape(
                 -1, self.num_experts)))

  @nn.compact
  def __call__(self, x_GxSxD: jax.Array, *,
               token_ids_GxS: Optional[jax.Array] = None,
               segment_ids_GxS: Optional[jax.Array] = None,
               expert_mask_GxSxE: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Returns y_GxSxD = sum_k w_k FFN_{e_k}(x) (+ shared dense expert)."""
    if x_GxSxD.ndim != 3:
      raise ValueError(f"MoeFeedForward expects x_GxSxD, got shape "
                       f"{x_GxSxD.shape}.")
    if (expert_mask_GxSxE is not None
        and expert_mask_GxSxE.shape[-1] != self.num_experts):
      raise ValueError(
          f"expert_mask_GxSxE has {expert_mask_GxSxE.shape[-1]} experts; the "
          f"layer has num_experts={self.num_experts}.")
    x_GxSxD = nn.with_logical_constraint(x_GxSxD.astype(self.dtype),
                                         ("batch", "length", "embed"))
    route, capacity = self._route(x_GxSxD, token_ids_GxS, segment_ids_GxS,
                                  expert_mask_GxSxE, deterministic)
    wi, wo, wi_gate = ExpertWeights(
        self.num_experts, self.expert_d_ff, self.gated, self.dtype,
        name="expert")(x_GxSxD.shape[-1])
    act = layers.get_activation(self.activation)

    def dispatch_group(x_SxD, route_S):
      return dispatch_lib.moe_mlp(
          x_SxD, route_S, wi, wo, impl=self.dispatch,
          capacity_factor=self.capacity_factor, activation=act,
          wi_gate_ExDxF=wi_gate, capacity=capacity)

    y_GxSxD, stats = jax.vmap(dispatch_group)(x_GxSxD, route)
    self._sow_metrics(route, stats)
    y_GxSxD = y_GxSxD.astype(self.dtype)
    if self.shared_expert_d_ff:
      y_GxSxD = y_GxSxD + layers.Mlp(
          self.shared_expert_d_ff, self.gated, self.activation, self.dtype,
          name="shared_mlp")(x_GxSxD)
    return nn.with_logical_constraint(y_GxSxD, ("batch", "length", "embed"))
