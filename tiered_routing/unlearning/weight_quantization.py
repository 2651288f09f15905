"""Round-to-nearest weight quantization: does forgetting survive int8 / int4?

Zhang et al. 2024 ("Catastrophic failure of LLM unlearning via
quantization", arXiv 2410.16454) found that 4-bit quantization of a model
unlearned by gradient ascent or NPO restores much of the forgotten
knowledge: the unlearning update is small next to the quantization step, so
rounding moves the weights back onto the original's grid. Exact unlearning
is immune by construction (the retrained or dropped partition never held
the knowledge), which the sweep's `quant_*` columns show next to every
approximate method.

`round_trip` quantizes every weight matrix symmetrically per output channel
(round to nearest, as the paper's RTN baseline) and dequantizes it back to
float32, so the model runs unchanged. One scale per channel: the maximum
absolute value over the axes that a matrix contracts with its input
(`contracted_axes`), divided by 2^(bits-1) - 1; every other axis (output
features, heads, experts, and the partition axis of private parameters) gets
its own scale. Vectors (norm scales) stay in float32, as in every
weight-only quantization scheme.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

BITS = (8, 4)

# Axes (counted from the end) each kind of matrix contracts with its input.
# Attention 'query'/'key'/'value' are [D, H, Q] and 'out' [H, Q, D]; MLP,
# expert, logits and router kernels are [.., in, out]; the token embedding
# [V, D] is quantized per token (each row is looked up on its own); a
# sequence gate's 'gates' [E, D] per expert.
_CONTRACTED = {
    "query": (-3,),
    "key": (-3,),
    "value": (-3,),
    "out": (-3, -2),
    "embedding": (-1,),
    "gates": (-1,),
}
_DEFAULT_CONTRACTED = (-2,)


def contracted_axes(name: str, ndim: int) -> tuple[int, ...]:
  """The axes one scale spans, for a parameter leaf called `name`."""
  axes = _CONTRACTED.get(name, _DEFAULT_CONTRACTED)
  if ndim < max(-a for a in axes):
    raise ValueError(
        f"Parameter {name!r} has {ndim} axes; quantizing it needs at least "
        f"{max(-a for a in axes)} (contracted axes {axes})."
    )
  return axes


def quantize_array(w, bits: int, axes: tuple[int, ...]) -> jax.Array:
  """w rounded to the symmetric `bits`-bit grid of its channels, in float32.

  Args:
    w: a weight array.
    bits: 8 or 4 (levels -(2^(b-1) - 1) .. 2^(b-1) - 1; symmetric, so zero
      stays exactly zero).
    axes: the axes one scale spans.

  Returns:
    The dequantized array: scale * round(w / scale), scale = max|w| over
    `axes` / (2^(bits-1) - 1); an all-zero channel stays zero.
  """
  if bits not in BITS:
    raise ValueError(f"bits={bits!r}; allowed: {BITS}.")
  w = jnp.asarray(w, jnp.float32)
  levels = 2 ** (bits - 1) - 1
  top = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  safe = jnp.where(top > 0, top, 1.0)
  # w * levels / max, not w / scale: exact where w is a multiple of a half
  # step, so ties round (to even) as the grid says.
  q = jnp.clip(jnp.round(w * levels / safe), -levels, levels)
  return jnp.where(top > 0, q * safe / levels, 0.0)


def round_trip(params: Any, bits: int) -> Any:
  """Every weight matrix of `params` quantized to `bits` and back.

  Args:
    params: a model's parameters (a nested dict of arrays, possibly with
      Flax's logical-partitioning boxes).
    bits: 8 or 4.

  Returns:
    The same tree; leaves with two or more axes are dequantized copies,
    vectors and scalars are returned unchanged.
  """
  if bits not in BITS:
    raise ValueError(f"bits={bits!r}; allowed: {BITS}.")

  def one(path, leaf):
    boxed = isinstance(leaf, flax.linen.meta.AxisMetadata)
    array = leaf.unbox() if boxed else leaf
    if np.ndim(array) < 2:
      return leaf
    name = str(getattr(path[-1], "key", path[-1]))
    new = quantize_array(array, bits, contracted_axes(name, np.ndim(array)))
    return leaf.replace_boxed(new) if boxed else new

  return jax.tree_util.tree_map_with_path(
      one, params, is_leaf=lambda x: isinstance(x, flax.linen.meta.AxisMetadata)
  )
