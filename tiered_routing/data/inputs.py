"""Input pipelines: SeqIO mixtures to batches grouped by partition.

Tier 1 trains each partition in isolation, so a global batch is laid out
`[P, B/P, L]`: row block p holds only partition p's data, drawn from that
partition's own mixture (`tasks.mixtures.partition_mixture_names`). Shared
modules flatten it to `[P*B/P, L]`; private ones map over the leading axis.

Data order is a pure function of (seed, step): each stream is a seeded,
repeated SeqIO dataset, so a resumed run rebuilds it and skips the batches
already consumed (`start_step`), reaching the same batches as a run that was
never interrupted.
"""

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tiered_routing.data import features
from tiered_routing.tier1 import schemes


def get_dataset(
    name: str,
    *,
    scheme: schemes.PartitionScheme,
    sequence_length: int,
    batch_size: int,
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = 0,
    pack: bool = True,
    num_epochs: int | None = None,
    shard_info: seqio.ShardInfo | None = None,
) -> tf.data.Dataset:
  """A batched dataset of one task or mixture with partitioned LM features.

  Args:
    name: registered SeqIO task or mixture.
    scheme: maps each sequence's language to its partition id.
    sequence_length: L, the packed row length.
    batch_size: rows per batch (per host when `shard_info` is given).
    split: "train" or "validation".
    shuffle: shuffle examples (with `seed`).
    seed: shuffle and mixture-sampling seed; fixes the data order.
    pack: pack several sequences per row.
    num_epochs: None repeats forever (training); 1 for evaluation.
    shard_info: this host's shard in multi-host runs.
  """
  if batch_size < 1 or sequence_length < 2:
    raise ValueError(
        f"Need batch_size >= 1 and sequence_length >= 2, got "
        f"batch_size={batch_size!r}, sequence_length={sequence_length!r}"
    )
  converter = features.PartitionedLMFeatureConverter(scheme, pack=pack)
  return seqio.get_dataset(
      name,
      task_feature_lengths={"targets": sequence_length},
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      feature_converter=converter,
      seed=seed,
      shard_info=shard_info,
      batch_size=batch_size,
      verbose=False,
  )


def partitioned_dataset(
    names: Sequence[str], *, global_batch_size: int, **kwargs
) -> tf.data.Dataset:
  """Zips one stream per partition into batches of shape [P, B/P, L].

  Args:
    names: one task or mixture per partition, in partition order.
    global_batch_size: B, split evenly over the P partitions.
    **kwargs: passed to `get_dataset` (scheme, sequence_length, ...).
  """
  num_partitions = len(names)
  if num_partitions < 1 or global_batch_size % num_partitions:
    raise ValueError(
        f"global_batch_size={global_batch_size!r} must be a positive "
        f"multiple of the number of partitions ({num_partitions})"
    )
  per_partition = global_batch_size // num_partitions
  seed = kwargs.pop("seed", 0)
  streams = tuple(
      get_dataset(
          name,
          batch_size=per_partition,
          seed=None if seed is None else seed + p,
          **kwargs,
      )
      for p, name in enumerate(names)
  )

  def stack(*batches):
    return {k: tf.stack([b[k] for b in batches]) for k in batches[0]}

  return tf.data.Dataset.zip(streams).map(stack)


def batch_iterator(
    dataset: tf.data.Dataset, start_step: int = 0
) -> Iterator[Mapping[str, np.ndarray]]:
  """NumPy batches from `start_step` on (deterministic resume)."""
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step!r}")
  return dataset.skip(start_step).prefetch(2).as_numpy_iterator()
