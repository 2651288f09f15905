"""Decoder-only MoE transformer with tier-1 partitions (`TieredDecoder`).

Batches arrive grouped by partition, `[P, B/P, L]`: tier 1 (the fixed map
from a sample's language to one of P partitions) has already been applied by
the data pipeline. How much the partitions share is `DecoderConfig.sharing`:

  'none'       P fully independent models (strict partitions; exact unlearning
               by retraining or dropping one partition). The whole decoder is
               `nn.vmap`ped over partitions, so every parameter has a leading
               'partition' axis and no gradient crosses partitions.
  'attention'  shared embeddings, attention and norms (applied to the flat
               `[P*B/P, L]` batch) with partition-private routers, experts and
               dense FFNs, like DEMix layers (Gururangan et al. 2022). Only the
               private parameters carry the leading 'partition' axis.
  'all'        one MoE over all rows with P * num_experts experts routed by
               tier 2 alone. Tier 1 can still be imposed as an expert mask
               (block-diagonal `expert_mask_PxE`,
               `tier1.layout.partition_expert_mask(jnp.arange(P), P, E)`).

Expert masks (bool, True = allowed) are `expert_mask_PxE`, used in every MoE
layer, or `expert_mask_MxPxE`, one per MoE layer: unlearning removes a
forget-critical expert only in the layer where it was found. A per-token
`expert_mask_MxPxBxLxE` replays a routing: allowing each token only the
experts another model chose for it makes the router choose them too (the
unlearning audits' routing replay).

Layers are pre-norm (RMSNorm) blocks with rotary attention; the feed-forward
of layer i is MoE when `i % moe_every == moe_every - 1` (so `moe_every=2`
alternates dense and MoE layers as in GShard / ST-MoE) and dense otherwise.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing import sharding
from tiered_routing.model import decoder_config
from tiered_routing.model import layers
from tiered_routing.model import moe

def _partition_vmap(target, in_axes):
  """`nn.vmap` over the leading tier-1 partition axis.

  Variables get a leading axis with logical name 'partition'. With
  spmd_axis_name, sharding constraints in the body put that axis on the
  mesh's 'partition' axis; call the result inside
  `sharding.inside_partition_map()` so that the body's own logical axes
  do not claim 'partition' a second time.
  """
  return nn.vmap(
      target, in_axes=in_axes, out_axes=0,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True, "jitter": True},
      metadata_params={nn.PARTITION_NAME: sharding.PARTITION_AXIS},
      spmd_axis_name=sharding.PARTITION_AXIS)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + Attn(Norm(x)), then x + FFN(Norm(x)).

  Attributes:
    config: the model config.
    use_moe: MoE (True) or dense (False) feed-forward.
    num_experts: experts of the MoE feed-forward.
    ffn_partitions: 0 if the feed-forward is shared by all rows; P if it is
      private per partition (rows are grouped by partition, so the FFN is
      `nn.vmap`ped over a leading partition axis of size P).
  """

  config: decoder_config.DecoderConfig
  use_moe: bool
  num_experts: int
  ffn_partitions: int = 0

  @nn.compact
  def __call__(self, x_BxLxD, token_ids_BxL, segment_ids_BxL, positions_BxL,
               expert_mask_BxE, deterministic):
    cfg, dtype = self.config, self.config.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    h = layers.RMSNorm(dtype=dtype, name="pre_attention_norm")(x_BxLxD)
    h = layers.MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate,
        cfg.rope_max_wavelength, name="attention")(
            h, segment_ids_BxL=segment_ids_BxL, positions_BxL=positions_BxL,
            deterministic=deterministic)
    x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
    h = layers.RMSNorm(dtype=dtype, name="pre_mlp_norm")(x_BxLxD)
    if self.use_moe:
      h = self._moe(h, token_ids_BxL, segment_ids_BxL, expert_mask_BxE,
                    deterministic)
    else:
      h = self._dense(h)
    x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

  def _maybe_private(self, fn):
    """`fn(module, *arrays)` with the module's parameters private per partition.

    With `ffn_partitions`, `fn` is `nn.vmap`ped over the leading partition
    axis of its arguments and of the module's variables, whose metadata gains
    the logical axis name 'partition'.
    """
    if not self.ffn_partitions:
      return fn
    mapped = _partition_vmap(fn, in_axes=0)

    def call(*args):
      with sharding.inside_partition_map():
        return mapped(*args)

    return call

  def _dense(self, h_BxLxD):
    cfg, p = self.config, self.ffn_partitions
    mlp = layers.Mlp(cfg.d_ff, cfg.gated_mlp, cfg.activation,
                     cfg.activation_dtype, name="mlp")
    apply = self._maybe_private(lambda module, h: module(h))
    if not p:
      return apply(mlp, h_BxLxD)
    b, l, d = h_BxLxD.shape
    return apply(mlp, h_BxLxD.reshape(p, b // p, l, d)).reshape(b, l, d)

  def _moe(self, h_BxLxD, token_ids_BxL, segment_ids_BxL, expert_mask_BxE,
           deterministic):
    cfg = self.config
    b, l, d = h_BxLxD.shape
    p = self.ffn_partitions or 1
    g, s = moe.group_shape(b // p, l, cfg.group_size)
    # Rows are grouped by partition, so each partition's groups are contiguous.
    lead = (p, g) if self.ffn_partitions else (g,)
    token_ids = token_ids_BxL.reshape(*lead, s)
    if segment_ids_BxL is None:  # Every row is one sequence.
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    segment_ids = moe.routing_segment_ids(
        segment_ids_BxL.reshape(p * g, s), l).reshape(*lead, s)
    mask = None
    if expert_mask_BxE is not None:  # [B, E] per row, or [B, L, E] per token.
      e = expert_mask_BxE.shape[-1]
      mask = jnp.broadcast_to(
          expert_mask_BxE if expert_mask_BxE.ndim == 3
          else expert_mask_BxE[:, None, :], (b, l, e))
      mask = mask.reshape(*lead, s, e)
    layer = moe.MoeFeedForward(
        num_experts=self.num_experts, expert_d_ff=cfg.expert_d_ff,
        top_k=cfg.top_k, router=cfg.router, router_jitter=cfg.router_jitter,
        vocab_size=cfg.vocab_size, dispatch=cfg.dispatch,
        capacity_factor=cfg.capacity_factor, gated=cfg.gated_mlp,
        activation=cfg.activation, shared_expert_d_ff=cfg.shared_expert_d_ff,
        dtype=cfg.activation_dtype, name="moe")

    def apply(module, x, ids, seg, mask):
      return module(x, token_ids_GxS=ids, segment_ids_GxS=seg,
                    expert_mask_GxSxE=mask, deterministic=deterministic)

    y = self._maybe_private(apply)(layer, h_BxLxD.reshape(*lead, s, d),
                                   token_ids, segment_ids, mask)
    return y.reshape(b, l, d)


class DecoderStack(nn.Module):
  """Embedding, blocks, final norm and logits over a flat batch of rows.

  Attributes:
    config: the model config.
    num_experts: experts per MoE layer.
    ffn_partitions: see `DecoderBlock`.
  """

  config: decoder_config.DecoderConfig
  num_experts: int
  ffn_partitions: int = 0

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL,
               expert_mask_MxBxE, deterministic):
    """Returns logits_BxLxV; `expert_mask_MxBxE[m]` masks MoE layer m
    (per row, or per token as [M, B, L, E])."""
    cfg, dtype = self.config, self.config.activation_dtype
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype,
                         name="token_embed")
    x_BxLxD = embed(tokens_BxL)
    x_BxLxD = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        x_BxLxD, deterministic=deterministic)
    mask_of = {i: None if expert_mask_MxBxE is None else expert_mask_MxBxE[m]
               for m, i in enumerate(cfg.moe_layers)}
    for i in range(cfg.num_layers):
      x_BxLxD = DecoderBlock(
          cfg, cfg.is_moe_layer(i), self.num_experts, self.ffn_partitions,
          name=f"layers_{i}")(x_BxLxD, tokens_BxL, segment_ids_BxL,
                              positions_BxL, mask_of.get(i), deterministic)
    x_BxLxD = layers.RMSNorm(dtype=dtype, name="decoder_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      return embed.attend(x_BxLxD)
    w_DxV = self.param(
        "logits_kernel", nn.with_logical_partitioning(
            layers.fan_in_init(0, 1), ("embed", "vocab")),
        (cfg.d_model, cfg.vocab_size), jnp.float32)
    logits = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV.astype(dtype),
                        preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class TieredDecoder(nn.Module):
  """Decoder over partition-grouped batches `[P, B/P, L]` (see module doc)."""

  config: decoder_config.DecoderConfig

  def _check_inputs(self, tokens_PxBxL, **others):
    cfg = self.config
    if tokens_PxBxL.ndim != 3 or tokens_PxBxL.shape[0] != cfg.num_partitions:
      raise ValueError(
          f"tokens_PxBxL has shape {tokens_PxBxL.shape}; expected [P, B/P, L] "
          f"with P = num_partitions = {cfg.num_partitions}.")
    for name, value in others.items():
      if value is not None and value.shape != tokens_PxBxL.shape:
        raise ValueError(f"{name} has shape {value.shape}; expected the "
                         f"tokens' shape {tokens_PxBxL.shape}.")

  def _expert_masks(self, expert_mask_PxE, expert_mask_MxPxE):
    """Validates either mask form; returns bool [M, P, E] or None."""
    cfg = self.config
    want = (cfg.num_partitions, cfg.experts_per_layer)
    where = (f"P = num_partitions, E = experts per MoE layer for sharing="
             f"{cfg.sharing!r}")
    if expert_mask_PxE is not None:
      if expert_mask_PxE.shape != want:
        raise ValueError(
            f"expert_mask_PxE has shape {expert_mask_PxE.shape}; expected "
            f"{want} ({where}); a per-layer mask goes in expert_mask_MxPxE.")
      expert_mask_MxPxE = jnp.broadcast_to(
          expert_mask_PxE[None], (len(cfg.moe_layers),) + want)
    elif expert_mask_MxPxE is not None:
      want = (len(cfg.moe_layers),) + want
      if expert_mask_MxPxE.shape != want:
        raise ValueError(
            f"expert_mask_MxPxE has shape {expert_mask_MxPxE.shape}; expected "
            f"{want} (M = MoE layers {cfg.moe_layers} in order; {where}).")
    return None if expert_mask_MxPxE is None else expert_mask_MxPxE.astype(bool)

  def _token_masks(self, mask_MxPxBxLxE, batch_shape):
    """Validates a per-token mask; returns bool [M, P * B/P, L, E]."""
    cfg = self.config
    p, b, l = batch_shape
    want = (len(cfg.moe_layers), p, b, l, cfg.experts_per_layer)
    if mask_MxPxBxLxE.shape != want:
      raise ValueError(
          f"expert_mask_MxPxBxLxE has shape {mask_MxPxBxLxE.shape}; expected "
          f"{want} (MoE layers, the batch's [P, B/P, L], experts per layer).")
    return mask_MxPxBxLxE.astype(bool).reshape(want[0], p * b, l, want[-1])

  @nn.compact
  def __call__(self, tokens_PxBxL: jax.Array, *,
               segment_ids_PxBxL: Optional[jax.Array] = None,
               positions_PxBxL: Optional[jax.Array] = None,
               expert_mask_PxE: Optional[jax.Array] = None,
               expert_mask_MxPxE: Optional[jax.Array] = None,
               expert_mask_MxPxBxLxE: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Returns float32 logits_PxBxLxV.

    Args:
      tokens_PxBxL: int token ids, rows grouped by tier-1 partition.
      segment_ids_PxBxL: packing segment ids (0 = padding); None = one
        sequence per row.
      positions_PxBxL: positions within segments; None = 0..L-1 per row.
      expert_mask_PxE: bool [P, E], True = expert allowed for partition p's
        tokens in every MoE layer (forced routing, tier 1 under sharing
        'all'); E = `config.experts_per_layer`.
      expert_mask_MxPxE: bool [M, P, E], entry m for MoE layer m, i.e. layer
        `config.moe_layers[m]` (unlearning by masking per-layer experts).
      expert_mask_MxPxBxLxE: bool, one mask per MoE layer and token (routing
        replay). At most one of the three masks may be given.
      deterministic: disables dropout and router jitter.
    """
    cfg = self.config
    self._check_inputs(tokens_PxBxL, segment_ids_PxBxL=segment_ids_PxBxL,
                       positions_PxBxL=positions_PxBxL)
    given = [m for m in (expert_mask_PxE, expert_mask_MxPxE,
                         expert_mask_MxPxBxLxE) if m is not None]
    if len(given) > 1:
      raise ValueError("Got several of expert_mask_PxE, expert_mask_MxPxE "
                       "and expert_mask_MxPxBxLxE; allowed: at most one.")
    p, b, l = tokens_PxBxL.shape
    if expert_mask_MxPxBxLxE is not None:
      mask_MxBxE = self._token_masks(expert_mask_MxPxBxLxE, (p, b, l))
    else:
      mask_MxPxE = self._expert_masks(expert_mask_PxE, expert_mask_MxPxE)
      # Row r of the flat, partition-major batch belongs to partition r // b.
      mask_MxBxE = (None if mask_MxPxE is None
                    else jnp.repeat(mask_MxPxE, b, axis=1))
    if cfg.sharing == "none":
      # Masks go in as [M, P, B/P, E]: their partition axis is axis 1.
      mask_MxPxBxE = (None if mask_MxBxE is None else mask_MxBxE.reshape(
          mask_MxBxE.shape[:1] + (p, b) + mask_MxBxE.shape[2:]))
      stack = _partition_vmap(DecoderStack, in_axes=(0, 0, 0, 1, None))
      with sharding.inside_partition_map():
        return stack(cfg, cfg.num_experts, name="decoder")(
            tokens_PxBxL, segment_ids_PxBxL, positions_PxBxL, mask_MxPxBxE,
            deterministic)
    flat = lambda a: None if a is None else a.reshape(p * b, l)
    ffn_partitions = p if cfg.sharing == "attention" else 0
    logits = DecoderStack(cfg, cfg.experts_per_layer, ffn_partitions,
                          name="decoder")(
                              flat(tokens_PxBxL), flat(segment_ids_PxBxL),
                              flat(positions_PxBxL), mask_MxBxE, deterministic)
    return logits.reshape(p, b, l, cfg.vocab_size)
