"""Where tier 1 puts a token: its partition, and the experts it may reach.

Training and evaluation batches are laid out `[P, B/P, L]`: row block p holds
only partition p's data, so a token's tier-1 partition is its block (the
batch layout *is* the tier-1 lookup; the model reads no partition ids).
Experts are numbered per MoE layer. Under sharing 'none' and 'attention'
partition p owns E private experts, which analyses number globally as
p * E + e; under sharing 'all' the P * E experts are one pool routed by tier
2 alone, and tier 1 can be imposed on it with `partition_expert_mask`
(block-diagonal: partition p's tokens may use experts [p * E, (p + 1) * E)).

Shape letters (one alphabet for the package, README "Layout"): P partitions,
B rows, L sequence length, T tokens, E experts, M MoE layers.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def checked_partitions(
    name: str, partitions: Sequence[int], num_partitions: int
) -> list[int]:
  """`partitions` as a list, or a ValueError naming `name` and the range.

  For the methods that act on some partitions only (ESFT's fine-tuned
  experts, an added expert's owners): an empty list or an id outside
  [0, P) is a configuration error, not an empty selection.
  """
  parts = list(partitions)
  if not parts or any(not 0 <= q < num_partitions for q in parts):
    raise ValueError(
        f"{name}={partitions!r}; allowed: a non-empty list of partitions "
        f"in [0, {num_partitions})."
    )
  return parts


def token_partition_ids(shape_PxBxL: tuple[int, int, int]) -> jax.Array:
  """int32 [T]: the tier-1 partition of each token of a `[P, B/P, L]` batch,
  tokens in the row-major order of `tokens_PxBxL.reshape(-1)`."""
  if len(shape_PxBxL) != 3:
    raise ValueError(f"Expected a [P, B/P, L] shape, got {shape_PxBxL}.")
  p, b, l = shape_PxBxL
  return jnp.repeat(jnp.arange(p, dtype=jnp.int32), b * l)


def global_expert_offsets(
    shape_PxBxL: tuple[int, int, int], num_experts: int, sharing: str
) -> np.ndarray:
  """int [T, 1]: add to a token's per-layer expert index to number it
  globally (partition p's private expert e is p * E + e); 0 under 'all',
  whose expert index is already global."""
  if sharing == "all":
    return np.zeros((int(np.prod(shape_PxBxL)), 1), np.int64)
  ids = np.asarray(token_partition_ids(shape_PxBxL), np.int64)
  return ids[:, None] * num_experts


def partition_expert_mask(
    partition_ids_T: jax.Array, num_partitions: int, experts_per_partition: int
) -> jax.Array:
  """Tier 1 as an expert mask over one pool of P * E experts (sharing 'all').

  Args:
    partition_ids_T: int partition of each token's sequence (or of each row
      of a [P, ...] mask: `jnp.arange(P)` gives the decoder's block-diagonal
      `expert_mask_PxE`). Ids outside [0, P) (e.g. -1 for padding) allow no
      expert.
    num_partitions: P.
    experts_per_partition: E.

  Returns:
    bool [T, P * E]: a token of partition p may use experts [p*E, (p+1)*E).
  """
  _check_positive_int("num_partitions", num_partitions)
  _check_positive_int("experts_per_partition", experts_per_partition)
  owner_E = (
      jnp.arange(num_partitions * experts_per_partition)
      // experts_per_partition
  )
  return owner_E[None, :] == jnp.asarray(partition_ids_T)[..., None]
