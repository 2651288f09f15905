"""Feature converter that carries language and partition ids through packing.

SeqIO pass-through features do not survive packing: packing concatenates
examples feature by feature, and only features given a packed length are
kept. So the language id of each sequence travels as a per-token feature
(`language_ids`, added by the task) and the converter maps it to a per-token
partition id with the scheme's lookup table before packing both alongside
`targets`. Every position of a packed row thus knows the language and
partition of the sequence it belongs to.

Model features (all int32, length L):
  decoder_target_tokens, decoder_input_tokens, decoder_loss_weights,
  decoder_language_ids, decoder_partition_ids,
  decoder_segment_ids, decoder_positions (packed only).
Padding positions have loss weight 0 and language/partition id 0; always
mask with the loss weights (or segment ids), never with the ids.
"""

from collections.abc import Mapping

import seqio
import tensorflow as tf

from tiered_routing.tier1 import schemes

LANGUAGE_IDS = "language_ids"
PARTITION_IDS = "partition_ids"


class PartitionedLMFeatureConverter(seqio.FeatureConverter):
  """Decoder-only LM features plus per-token language and partition ids.

  Args:
    scheme: tier-1 partition scheme that maps language ids to partitions.
    pack: pack several sequences into one row (T5X-style).
    use_custom_packing_ops: SeqIO's faster packing op (TPU builds only).
  """

  TASK_FEATURES = {
      "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32
      ),
      "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32
      ),
      "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32
      ),
      "decoder_language_ids": seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32
      ),
      "decoder_partition_ids": seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32
      ),
  }
  PACKING_FEATURE_DTYPES = {
      "decoder_segment_ids": tf.int32,
      "decoder_positions": tf.int32,
  }

  def __init__(
      self,
      scheme: schemes.PartitionScheme,
      pack: bool = True,
      use_custom_packing_ops: bool = False,
  ):
    self._table = tf.constant(scheme.language_to_partition_table())
    self.scheme = scheme
    super().__init__(pack=pack, use_custom_packing_ops=use_custom_packing_ops)

  def _add_partition_ids(self, ex: Mapping[str, tf.Tensor]):
    if LANGUAGE_IDS not in ex:
      raise ValueError(
          f"Examples need a per-token {LANGUAGE_IDS!r} feature to derive"
          f" partition ids; got features {sorted(ex)} (use a task from "
          "the `tasks` package)"
      )
    # SeqIO's packer measures a sequence by its non-zero entries, so ids
    # travel shifted by one (0 stays padding) and are restored after.
    return {
        "targets": ex["targets"],
        LANGUAGE_IDS: ex[LANGUAGE_IDS] + 1,
        PARTITION_IDS: tf.gather(self._table, ex[LANGUAGE_IDS]) + 1,
    }

  @staticmethod
  def _unshift(ids: tf.Tensor) -> tf.Tensor:
    return tf.maximum(ids - 1, 0)

  def _convert_example(self, ex: Mapping[str, tf.Tensor]):
    segment_ids = ex.get("targets_segment_ids")
    features = {
        "decoder_target_tokens": ex["targets"],
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
            ex["targets"], sequence_id=segment_ids, bos_id=self.bos_id
        ),
        "decoder_loss_weights": seqio.non_padding_position(ex["targets"]),
        "decoder_language_ids": self._unshift(ex[LANGUAGE_IDS]),
        "decoder_partition_ids": self._unshift(ex[PARTITION_IDS]),
    }
    if self.pack:
      features["decoder_segment_ids"] = segment_ids
      features["decoder_positions"] = ex["targets_positions"]
    return features

  def _convert_features(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    length = task_feature_lengths["targets"]
    ds = ds.map(self._add_partition_ids, num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._pack_or_pad(
        ds, {"targets": length, LANGUAGE_IDS: length, PARTITION_IDS: length}
    )
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]
  ) -> Mapping[str, int]:
    length = task_feature_lengths["targets"]
    names = list(self.MODEL_FEATURES)
    if self.pack:
      names += list(self.PACKING_FEATURE_DTYPES)
    return {name: length for name in names}
