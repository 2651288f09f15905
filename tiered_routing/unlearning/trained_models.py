"""Training the models an unlearning experiment compares.

Every configuration trains two models with `trainer.train`: the original on
its partitions' streams and the reference on the same streams with the
forget language removed from its partition's (`DataCache` supplies both).
Checkpoints go to `<work_dir>/original` and `<work_dir>/reference`, so a rerun
restores instead of retraining.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from tiered_routing.train import optimizers
from tiered_routing.train import trainer
from tiered_routing.model import transformer
from tiered_routing.data import stream_cache


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How a configuration's models are trained (original and reference)."""

  model_config: transformer.DecoderConfig
  optimizer_config: optimizers.OptimizerConfig
  train_config: trainer.TrainConfig
  batch_size: int
  sequence_length: int

  def __post_init__(self):
    p = self.model_config.num_partitions
    if self.batch_size < p or self.batch_size % p:
      raise ValueError(
          f"batch_size={self.batch_size} must be a positive "
          f"multiple of num_partitions={p}."
      )

  @property
  def batch_shape(self) -> tuple[int, int, int]:
    p = self.model_config.num_partitions
    return (p, self.batch_size // p, self.sequence_length)


def train_model(
    model_dir: str,
    spec: TrainSpec,
    names: Sequence[Optional[str]],
    cache: stream_cache.DataCache,
    mesh,
) -> tuple[Any, np.ndarray]:
  """Trains (or restores) a model on one stream per partition (None = none).

  Returns:
    (params, training tokens per partition, int64 [P]; see
    `DataCache.training_batches`).
  """
  if len(names) != spec.model_config.num_partitions:
    raise ValueError(
        f"{len(names)} streams for "
        f"{spec.model_config.num_partitions} partitions."
    )
  _, rows, _ = spec.batch_shape
  batches, tokens = cache.training_batches(
      names, rows, spec.train_config.train_steps
  )
  state = trainer.train(
      model_dir=model_dir,
      model_config=spec.model_config,
      optimizer_config=spec.optimizer_config,
      config=spec.train_config,
      batches=batches,
      batch_shape=spec.batch_shape,
      mesh=mesh,
  )
  return state.params, tokens


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
