"""One partition of a strict-partition model, as a model of its own.

Under sharing 'none' every parameter has a leading partition axis and the
partitions never interact (`model.transformer` module doc), so partition p
alone is a `TieredDecoder` with num_partitions = 1 whose parameters are
slice p. Running it alone costs 1/P of the whole model: unlearning,
evaluation and generation that touch one partition do so. Exact unlearning
by retraining one partition (SISA, Bourtoule et al. 2021) must leave the
others bitwise untouched, which `identical_except` checks.
"""

import dataclasses
from typing import Any, TypeVar

import jax
import numpy as np

Config = TypeVar("Config")


def partition_params(params: Any, partition: int) -> Any:
  """Partition p of strict-partition params as a one-partition model's."""
  return jax.tree.map(lambda x: x[partition : partition + 1], params)


def with_partition_params(params: Any, partition: int, sub: Any) -> Any:
  """`params` with partition p replaced by a one-partition model's `sub`."""
  return jax.tree.map(lambda x, s: x.at[partition].set(s[0]), params, sub)


def one_partition_config(config: Config) -> Config:
  """The config of one partition of a sharing-'none' model (a
  `DecoderConfig` with num_partitions = 1)."""
  return dataclasses.replace(config, num_partitions=1)


def identical_except(a: Any, b: Any, partition: int) -> bool:
  """Whether two strict-partition param trees agree bitwise off `partition`.

  Every leaf must have the leading partition axis (sharing 'none').
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    keep = np.arange(x.shape[0]) != partition
    if not np.array_equal(x[keep], y[keep]):
      return False
  return True
