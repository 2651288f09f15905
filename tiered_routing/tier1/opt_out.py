"""Opt-out at inference: partitions switched off without retraining anything.

Strict partitions make removal at serving time a routing decision: a
partition that is switched off is never run, so what it learned cannot
reach any output (exact unlearning by dropping, `unlearning.exact`, is the
same act made permanent). What changes is where text goes:

  oracle      a row whose language's partition is off has no route; it is
              scored as the uniform distribution over the vocabulary (a
              system that must answer falls back to knowing nothing), as
              the sweep scores a dropped partition.
  classifier  routes among the partitions left: the posterior is
              restricted to them and renormalized.
  ensemble    mixes only the partitions left (their restricted posterior is
              the mixture weight, or the prior of the prefix weighting).

The disabled partitions are given as indices (`disabled`) or through the
languages whose partitions are to go (`partitions_of`).
"""

from collections.abc import Sequence

import numpy as np

from tiered_routing.tier1 import schemes


def check_disabled(disabled: Sequence[int], num_partitions: int) -> tuple:
  """`disabled` as a sorted tuple, validated against P partitions.

  Raises:
    ValueError: an entry is not a partition index, or nothing is left.
  """
  out = []
  for p in disabled:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not (
        0 <= p < num_partitions):
      raise ValueError(
          f"disabled partition {p!r}; allowed: ints in 0..{num_partitions - 1}"
      )
    out.append(int(p))
  out = tuple(sorted(set(out)))
  if len(out) == num_partitions:
    raise ValueError(
        f"disabled_partitions={list(out)} switches off all {num_partitions} "
        "partitions; at least one must stay on."
    )
  return out


def enabled_mask(num_partitions: int, disabled: Sequence[int]) -> np.ndarray:
  """bool [P]: True for the partitions left on."""
  mask = np.ones(num_partitions, bool)
  mask[list(check_disabled(disabled, num_partitions))] = False
  return mask


def restrict_posterior(posterior_xP, enabled_P: np.ndarray) -> np.ndarray:
  """P(partition | text) over the enabled partitions only, renormalized.

  A row with no mass on any enabled partition becomes uniform over them.
  """
  post = np.asarray(posterior_xP, np.float64) * enabled_P
  total = post.sum(axis=-1, keepdims=True)
  uniform = enabled_P / enabled_P.sum()
  return np.where(total > 0, post / np.where(total > 0, total, 1.0), uniform)


def partitions_of(
    scheme: schemes.PartitionScheme, codes: Sequence[str]
) -> tuple[int, ...]:
  """The partitions that own `codes` (opting a language out disables its
  whole partition: strict partitions hold no per-language parameters)."""
  return tuple(sorted({scheme.partition_of(c) for c in codes}))
