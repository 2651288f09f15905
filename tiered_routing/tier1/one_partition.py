"""One partition of a sharing-'none' model as a one-partition model.

Under sharing 'none' every parameter has a leading partition axis and the
partitions never interact (`transformer` module doc), so partition p alone
is a `TieredDecoder` with num_partitions = 1 whose parameters are slice p.
Running it alone costs 1/P of the whole model: unlearning, evaluation and
generation that touch one partition do so.
"""

import dataclasses
from typing import Any

import jax

from tiered_routing.model import transformer


def partition_params(params: Any, partition: int) -> Any:
  """Partition p of strict-partition params as a one-partition model's."""
  return jax.tree.map(lambda x: x[partition : partition + 1], params)


def with_partition_params(params: Any, partition: int, sub: Any) -> Any:
  """`params` with partition p replaced by a one-partition model's `sub`."""
  return jax.tree.map(lambda x, s: x.at[partition].set(s[0]), params, sub)


def one_partition_config(
    config: transformer.DecoderConfig,
) -> transformer.DecoderConfig:
  """The config of one partition of a sharing-'none' model."""
  return dataclasses.replace(config, num_partitions=1)
