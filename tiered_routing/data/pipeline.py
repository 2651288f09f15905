"""Input pipelines: SeqIO tasks and mixtures to `[P, B/P, L]` model batches.

Tier 1 trains each partition in isolation, so a global batch is laid out
`[P, B/P, L]`: row block p holds only partition p's data, drawn from that
partition's own mixture (`seqio_names.partition_mixture_names`). The layout
*is* the tier-1 lookup: the model reads no partition ids, shared modules
flatten the batch to `[P*B/P, L]` and private ones map over its leading
axis.

`LanguageLMFeatureConverter` packs sequences T5X-style and carries each
token's language id through packing. SeqIO pass-through features do not
survive packing (packing concatenates examples feature by feature and keeps
only features given a packed length), so the language id travels as a
per-token feature (`language_ids`, added by the task) packed alongside
`targets`. Every position of a packed row thus knows the language of the
sequence it belongs to, which per-language metrics need.

Model features (all int32, length L; `MODEL_FEATURES`):
  decoder_target_tokens, decoder_input_tokens, decoder_loss_weights,
  decoder_language_ids, decoder_segment_ids, decoder_positions (packed only).
Padding positions have loss weight 0 and language id 0; always mask with the
loss weights (or segment ids), never with the ids.

Data order is a pure function of (seed, step): each stream is a seeded,
repeated SeqIO dataset, so a resumed run rebuilds it and skips the batches
already consumed (`batch_iterator(dataset, start_step)`), reaching the same
batches as a run that was never interrupted.
"""

from collections.abc import Iterator, Mapping, Sequence
import re
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from tiered_routing.data import host_shards

LANGUAGE_IDS = "language_ids"
MODEL_FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_language_ids",
    "decoder_segment_ids",
    "decoder_positions",
)
PACKING_FEATURES = ("decoder_segment_ids", "decoder_positions")
_SPEC = seqio.FeatureConverter.FeatureSpec


class LanguageLMFeatureConverter(seqio.FeatureConverter):
  """Decoder-only LM features plus per-token language ids.

  Args:
    pack: pack several sequences into one row (T5X-style).
    use_custom_packing_ops: SeqIO's faster packing op (TPU builds only).
  """

  TASK_FEATURES = {"targets": _SPEC(dtype=tf.int32)}
  MODEL_FEATURES = {
      name: _SPEC(dtype=tf.int32)
      for name in MODEL_FEATURES
      if name not in PACKING_FEATURES
  }
  PACKING_FEATURE_DTYPES = {name: tf.int32 for name in PACKING_FEATURES}

  def _with_language_ids(self, ex: Mapping[str, tf.Tensor]):
    if LANGUAGE_IDS not in ex:
      raise ValueError(
          f"Examples need a per-token {LANGUAGE_IDS!r} feature; got features"
          f" {sorted(ex)} (use a task from the `tasks` package)"
      )
    # SeqIO's packer measures a sequence by its non-zero entries, so ids
    # travel shifted by one (0 stays padding) and are restored after.
    return {"targets": ex["targets"], LANGUAGE_IDS: ex[LANGUAGE_IDS] + 1}

  def _convert_example(self, ex: Mapping[str, tf.Tensor]):
    segment_ids = ex.get("targets_segment_ids")
    features = {
        "decoder_target_tokens": ex["targets"],
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
            ex["targets"], sequence_id=segment_ids, bos_id=self.bos_id
        ),
        "decoder_loss_weights": seqio.non_padding_position(ex["targets"]),
        "decoder_language_ids": tf.maximum(ex[LANGUAGE_IDS] - 1, 0),
    }
    if self.pack:
      features["decoder_segment_ids"] = segment_ids
      features["decoder_positions"] = ex["targets_positions"]
    return features

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]
    ds = ds.map(self._with_language_ids, num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._pack_or_pad(ds, {"targets": length, LANGUAGE_IDS: length})
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]
  ) -> Mapping[str, int]:
    length = task_feature_lengths["targets"]
    names = list(self.MODEL_FEATURES)
    if self.pack:
      names += list(self.PACKING_FEATURE_DTYPES)
    return {name: length for name in names}


def get_dataset(
    name: str,
    *,
    sequence_length: int,
    batch_size: int,
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = 0,
    pack: bool = True,
    num_epochs: int | None = None,
    shard_info: seqio.ShardInfo | None = None,
) -> tf.data.Dataset:
  """A batched dataset of one task or mixture with the model features.

  Args:
    name: registered SeqIO task or mixture.
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
  return seqio.get_dataset(
      name,
      task_feature_lengths={"targets": sequence_length},
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      feature_converter=LanguageLMFeatureConverter(pack=pack),
      seed=seed,
      shard_info=shard_info,
      batch_size=batch_size,
      verbose=False,
  )


def partitioned_dataset(
    names: Sequence[str],
    *,
    global_batch_size: int,
    block: Optional[host_shards.HostBlock] = None,
    **kwargs,
) -> tf.data.Dataset:
  """Zips one stream per partition into batches of shape [P, B/P, L].

  Args:
    names: one task or mixture per partition, in partition order.
    global_batch_size: B, split evenly over the P partitions.
    block: the part of each global batch this process reads
      (`host_shards.host_block`): its partitions, and within each its row
      shards, row shard j reading `ShardInfo(j, block.num_row_shards)`;
      None = the whole batch in one row shard.
    **kwargs: passed to `get_dataset` (sequence_length, seed, ...);
      partition p's stream uses seed + p.

  Returns:
    Batches of `block.shape`.
  """
  block = _checked_block(len(names), global_batch_size, block)
  seed = kwargs.pop("seed", 0)
  shards = block.num_row_shards
  streams = tuple(
      get_dataset(
          names[p],
          batch_size=block.rows_per_shard,
          seed=None if seed is None else seed + p,
          shard_info=seqio.ShardInfo(j, shards) if shards > 1 else None,
          **kwargs,
      )
      for p in block.partitions
      for j in block.row_shards
  )
  per = len(block.row_shards)

  def stack(*batches):
    """[partition][shard] batches -> [partitions, rows of the shards, L]."""
    return {
        k: tf.stack([
            tf.concat([b[k] for b in batches[i * per:(i + 1) * per]], 0)
            for i in range(len(block.partitions))
        ])
        for k in batches[0]
    }

  return tf.data.Dataset.zip(streams).map(stack)


def _checked_block(
    num_partitions: int,
    global_batch_size: int,
    block: Optional[host_shards.HostBlock],
) -> host_shards.HostBlock:
  """`block`, or the whole batch, once it fits P partitions of B rows."""
  if num_partitions < 1 or global_batch_size % num_partitions:
    raise ValueError(
        f"global_batch_size={global_batch_size!r} must be a positive "
        f"multiple of the number of partitions ({num_partitions})"
    )
  rows = global_batch_size // num_partitions
  if block is None:
    return host_shards.whole_batch((num_partitions, rows, 0))
  if block.global_shape[:2] != (num_partitions, rows):
    raise ValueError(
        f"The host block of {block.global_shape} does not fit "
        f"{num_partitions} partitions of {global_batch_size} rows.")
  return block


def batch_iterator(
    dataset: tf.data.Dataset, start_step: int = 0
) -> Iterator[Mapping[str, np.ndarray]]:
  """NumPy batches from `start_step` on (deterministic resume).

  An error reading the data (a bad line, a damaged file) is raised as a
  ValueError with the first line of TensorFlow's message, which names the
  file when the source does, instead of TensorFlow's graph context."""
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step!r}")
  return _data_errors(dataset.skip(start_step).prefetch(2).as_numpy_iterator())


def _data_errors(batches):
  try:
    yield from batches
  except tf.errors.OpError as e:
    raise ValueError(f"Reading the data failed: {_first_line(e)}") from None


def _first_line(error) -> str:
  """TensorFlow's message without its graph context: the first line, or
  the data of a failed assertion (a source's own check)."""
  text = (error.message or type(error).__name__).strip().splitlines()[0]
  text = re.sub(r"\{\{.*?\}\}\s*", "", text).replace("\\'", "'")
  failed = re.search(r"assertion failed: \[(.*)\]", text)
  return failed.group(1) if failed else text
