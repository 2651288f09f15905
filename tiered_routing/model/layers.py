"""Dense building blocks of the decoder: embedding, RMSNorm, attention, MLP.

Parameters are stored in float32 and annotated with logical axis names
(`nn.with_logical_partitioning`); activations are computed in the module's
`dtype` (bfloat16 for real runs, float32 in tests) and key activations are
constrained with `nn.with_logical_constraint`. Logical names are mapped to mesh
axes only in `tiered_routing/sharding.py`.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation function by name (one of ACTIVATIONS)."""
  if name not in ACTIVATIONS:
    raise ValueError(
        f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def fan_in_init(in_axis, out_axis,
                batch_axis=()) -> nn.initializers.Initializer:
  """Truncated-normal init with variance 1/fan_in (T5 / Mesh TF default)."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied logits.

  Attributes:
    num_embeddings: vocabulary size V.
    features: model dimension D.
    dtype: activation dtype.
  """

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    # Unit-variance rows, as in T5: the residual stream starts at scale 1.
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.embedding, ids_BxL, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Float32 logits x @ E^T, scaled by 1/sqrt(D).

    With unit-variance embeddings the scale keeps initial logits O(1); this is
    the tied-embedding rescaling of Mesh TensorFlow / T5 (Raffel et al. 2020).
    """
    x_BxLxD = x_BxLxD * jnp.asarray(self.features**-0.5, self.dtype)
    logits_BxLxV = jnp.einsum(
        "bld,vd->blv", x_BxLxD, self.embedding.astype(self.dtype),
        preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxLxV,
                                      ("batch", "length", "vocab"))


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019), in float32."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    scale_D = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        (x_BxLxD.shape[-1],), jnp.float32)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)
                          + self.epsilon)
    return (x * scale_D).astype(self.dtype)


def apply_rotary(x_BxLxHxQ: jax.Array, positions_BxL: jax.Array,
                 max_wavelength: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (RoFormer, Su et al. 2021).

  Rotates feature pairs (i, i + Q/2) by angle position / wavelength_i, so the
  query-key dot product depends only on the relative position. Positions come
  from the data (they restart at 0 in every packed segment).
  """
  k = x_BxLxHxQ.shape[-1]
  if k % 2:
    raise ValueError(f"Rotary embeddings need an even head_dim, got {k}.")
  fraction_K2 = 2.0 * jnp.arange(k // 2, dtype=jnp.float32) / k
  inv_wavelength_K2 = max_wavelength**-fraction_K2
  angle_BxLx1xK2 = (positions_BxL.astype(jnp.float32)[:, :, None, None]
                    * inv_wavelength_K2)
  sin, cos = jnp.sin(angle_BxLx1xK2), jnp.cos(angle_BxLx1xK2)
  x1, x2 = jnp.split(x_BxLxHxQ.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxHxQ.dtype)


def causal_segment_mask(length: int,
                        segment_ids_BxL: Optional[jax.Array] = None,
                        batch: int = 1) -> jax.Array:
  """Bool mask [B, 1, L, L]: query i sees key j iff j <= i (and same segment).

  With packing (several sequences per row, T5 "pack" feature converter) a token
  must attend only to earlier tokens of its own segment.
  """
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  if segment_ids_BxL is None:
    return jnp.broadcast_to(causal_LxL, (batch, 1, length, length))
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (same_BxLxL & causal_LxL)[:, None, :, :]


class MultiHeadAttention(nn.Module):
  """Causal multi-head self-attention with rotary positions and segment ids.

  Attributes:
    num_heads: H.
    head_dim: Q (even, for rotary embeddings).
    dtype: activation dtype; softmax is computed in float32.
    dropout_rate: dropout on attention probabilities.
    rope_max_wavelength: base of the rotary frequencies.
  """

  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.0
  rope_max_wavelength: float = 10_000.0

  def _kernel(self, name, shape, axes, in_axis, out_axis):
    init = fan_in_init(in_axis, out_axis)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *,
               segment_ids_BxL: Optional[jax.Array] = None,
               positions_BxL: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    b, l, d = x_BxLxD.shape
    h, k = self.num_heads, self.head_dim
    qkv_axes = ("embed", "heads", "kv")
    wq_DxHxQ = self._kernel("query", (d, h, k), qkv_axes, 0, (1, 2))
    wk_DxHxQ = self._kernel("key", (d, h, k), qkv_axes, 0, (1, 2))
    wv_DxHxQ = self._kernel("value", (d, h, k), qkv_axes, 0, (1, 2))
    wo_HxQxD = self._kernel("out", (h, k, d), ("heads", "kv", "embed"),
                            (0, 1), 2)
    x_BxLxD = x_BxLxD.astype(self.dtype)
    act_axes = ("batch", "length", "heads", "kv")
    q = nn.with_logical_constraint(
        jnp.einsum("bld,dhk->blhk", x_BxLxD, wq_DxHxQ), act_axes)
    k_ = nn.with_logical_constraint(
        jnp.einsum("bld,dhk->blhk", x_BxLxD, wk_DxHxQ), act_axes)
    v = nn.with_logical_constraint(
        jnp.einsum("bld,dhk->blhk", x_BxLxD, wv_DxHxQ), act_axes)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    q = apply_rotary(q, positions_BxL, self.rope_max_wavelength)
    k_ = apply_rotary(k_, positions_BxL, self.rope_max_wavelength)
    q = q * jnp.asarray(k**-0.5, self.dtype)
    logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q, k_,
                                preferred_element_type=jnp.float32)
    mask_Bx1xLxL = causal_segment_mask(l, segment_ids_BxL, b)
    # The diagonal is always visible, so no row is fully masked.
    logits_BxHxLxL = jnp.where(mask_Bx1xLxL, logits_BxHxLxL,
                               jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out_BxLxHxQ = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    y_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxQ, wo_HxQxD)
    return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))


class Mlp(nn.Module):
  """Position-wise feed-forward act(x Wi [* x Wi_gate]) Wo.

  The gated form is GEGLU/SwiGLU (Shazeer 2020), used by T5.1.1 and ST-MoE.

  Attributes:
    d_ff: hidden size F.
    gated: whether to use a gated linear unit.
    activation: name in ACTIVATIONS.
    dtype: activation dtype.
  """

  d_ff: int
  gated: bool = True
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32

  def _kernel(self, name, shape, axes):
    return self.param(
        name, nn.with_logical_partitioning(fan_in_init(0, 1), axes), shape,
        jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    d = x_BxLxD.shape[-1]
    act = get_activation(self.activation)
    x_BxLxD = x_BxLxD.astype(self.dtype)
    wi_DxF = self._kernel("wi", (d, self.d_ff), ("embed", "mlp"))
    h_BxLxF = act(x_BxLxD @ wi_DxF)
    if self.gated:
      h_BxLxF = h_BxLxF * (
          x_BxLxD @ self._kernel("wi_gate", (d, self.d_ff), ("embed", "mlp")))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    wo_FxD = self._kernel("wo", (self.d_ff, d), ("mlp", "embed"))
    return nn.with_logical_constraint(h_BxLxF @ wo_FxD,
                                      ("batch", "length", "embed"))
