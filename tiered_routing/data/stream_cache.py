"""SeqIO data of an unlearning experiment, built once per stream.

A trade-off sweep trains and unlearns many models on the same few SeqIO
streams: the original and the reference model of a configuration share every
partition's stream but one, configurations with the same scheme and batch
share all of them, and every configuration evaluates the same per-language
validation sets. Building a SeqIO pipeline costs seconds (mostly tracing the
feature converter), on a 2-core CPU more than the training steps it feeds, so
`DataCache` builds each stream once. On small corpora (`materialize=True`) it
keeps the batches in memory; on mC4 it hands the trainer a streaming
pipeline and keeps only the few batches unlearning needs.

Training streams are exactly what the trainer's input pipeline yields:
partition q of a `[P, B/P, L]` batch is `pipeline.get_dataset(name_q,
batch_size=B/P, seed=seed + q)`, the streams `pipeline.partitioned_dataset`
zips, so a model trained here sees the batches the `train` binary would. A
stream does not depend on the partition scheme (tier 1 is the batch layout),
so configurations with different schemes share it.

A partition without data (its only language was forgotten) is given as None
and gets all-zero rows: loss weight 0, so it contributes nothing.
"""

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Callable, Optional

import numpy as np
import seqio
import tensorflow as tf

from tiered_routing.data import feature_rows
from tiered_routing.data import pipeline
from tiered_routing.tier1 import languages

Rows = feature_rows.Rows
BatchesFn = Callable[[int], Iterator[Rows]]
FEATURES = pipeline.MODEL_FEATURES


def _keep(batch: Mapping[str, np.ndarray]) -> Rows:
  """The model's features (packing features only if packed)."""
  return {k: np.asarray(batch[k], np.int32) for k in FEATURES if k in batch}


class DataCache:
  """Builds each SeqIO stream once.

  Args:
    sequence_length: L, the packed row length.
    seed: data seed; partition q's training stream uses seed + q, as in
      `pipeline.partitioned_dataset`.
    pack: pack several sequences per training row.
    materialize: keep whole training streams in memory (small corpora);
      False streams them from SeqIO during training.
    max_validation_examples: evaluate at most this many held-out rows per
      language, packed and spread over the split (None = the whole split,
      one sequence per row); see `validation_rows`.
    held_out: where `validation_rows` keeps its rows, {(language code,
      split): rows} (default: a dict of its own). Held-out rows do not
      depend on the data seed, so caches of several seeds may share one
      store, and a store on disk lets several processes share it
      (`unlearning.held_out_store`); every cache sharing a store must
      have the same sequence_length, pack, max_validation_examples and
      tasks.
  """

  def __init__(
      self,
      sequence_length: int,
      seed: int = 0,
      pack: bool = True,
      materialize: bool = True,
      max_validation_examples: Optional[int] = None,
      held_out: Optional[MutableMapping[tuple[str, str], Rows]] = None,
  ):
    if sequence_length < 2:
      raise ValueError(f"sequence_length={sequence_length!r} must be >= 2.")
    self.sequence_length = sequence_length
    self.seed = seed
    self.pack = pack
    self.materialize = materialize
    self.max_validation_examples = max_validation_examples
    self._streams: dict[tuple, Rows] = {}
    self._validation = {} if held_out is None else held_out

  def _dataset(self, name: str, seed: int, rows: int) -> tf.data.Dataset:
    return pipeline.get_dataset(
        name,
        sequence_length=self.sequence_length,
        batch_size=rows,
        seed=seed,
        pack=self.pack,
    ).map(lambda b: {k: b[k] for k in FEATURES if k in b})

  def stream(self, name: str, seed: int, rows: int, num_batches: int) -> Rows:
    """The first `num_batches` [rows, L] training batches of one stream.

    Returns:
      {feature: int32 [num_batches, rows, L]}.
    """
    if rows < 1 or num_batches < 1:
      raise ValueError(
          f"Need rows >= 1 and num_batches >= 1, got rows="
          f"{rows!r}, num_batches={num_batches!r}."
      )
    key = (name, seed, rows)
    cached = self._streams.get(key)
    if cached is None or len(cached[FEATURES[0]]) < num_batches:
      batches = [
          _keep(b)
          for b in (
              self._dataset(name, seed, rows)
              .take(num_batches)
              .as_numpy_iterator()
          )
      ]
      cached = feature_rows.stack(batches, axis=0)
      self._streams[key] = cached
    return {k: v[:num_batches] for k, v in cached.items()}

  def partitioned(
      self,
      names: Sequence[Optional[str]],
      rows: int,
      num_batches: int,
      first_partition: int = 0,
  ) -> Rows:
    """The first batches of one stream per partition (None = no data).

    Args:
      names: one mixture per partition.
      rows: B/P.
      num_batches: how many.
      first_partition: the partition index of names[0]: partition q's
        stream is seeded seed + q, so partition p retrained alone
        (`names` of length 1, first_partition=p) reads the stream it had
        in the whole model.

    Returns:
      {feature: int32 [num_batches, P, rows, L]}; batch s is the batch
      `pipeline.partitioned_dataset(names, ...)` yields at step s.
    """
    parts = [
        None
        if n is None
        else self.stream(n, self.seed + first_partition + q, rows, num_batches)
        for q, n in enumerate(names)
    ]
    template = next((p for p in parts if p is not None), None)
    if template is None:
      raise ValueError(f"No partition has data: names={list(names)}.")
    return feature_rows.stack(
        [feature_rows.zeros_like(template) if p is None else p for p in parts],
        axis=1,
    )

  def training_batches(
      self,
      names: Sequence[Optional[str]],
      rows: int,
      num_steps: int,
      first_partition: int = 0,
  ) -> tuple[BatchesFn, np.ndarray]:
    """`trainer.train`'s `batches(start)` and the tokens per partition.

    `first_partition` as in `partitioned`.

    Returns:
      (batches, tokens_P): scored tokens per partition over all steps when
      materialized; streaming, rows * L * num_steps per partition with data
      (padding included: an upper bound).
    """
    if self.materialize:
      batches = self.partitioned(names, rows, num_steps, first_partition)
      tokens = np.sum(batches["decoder_loss_weights"] > 0, axis=(0, 2, 3))
      return _from_arrays(batches), tokens
    tokens = np.array(
        [
            0 if n is None else rows * self.sequence_length * num_steps
            for n in names
        ],
        np.int64,
    )
    return self._streaming(names, rows, num_steps, first_partition), tokens

  def _streaming(self, names, rows, num_steps, first) -> BatchesFn:
    keys = [
        k for k in FEATURES if self.pack or k not in pipeline.PACKING_FEATURES
    ]
    zeros = tf.data.Dataset.from_tensors(
        {k: np.zeros((rows, self.sequence_length), np.int32) for k in keys}
    ).repeat()
    streams = tuple(
        zeros if n is None else self._dataset(n, self.seed + first + q, rows)
        for q, n in enumerate(names)
    )
    zipped = tf.data.Dataset.zip(streams).map(
        lambda *bs: {k: tf.stack([b[k] for b in bs]) for k in bs[0]}
    )

    def batches_from(start: int) -> Iterator[Rows]:
      return pipeline.batch_iterator(zipped.take(num_steps), start)

    return batches_from

  def validation_rows(
      self, tasks: Mapping[str, str], split: str = "validation"
  ) -> dict[str, Rows]:
    """Every language's held-out rows.

    Without a limit: the whole split, one sequence per row (rows are not
    packed, so each holds one language and can be laid out by partition; a
    model that respects segments scores every token as it would packed).
    With `max_validation_examples` = m: each language's split packed into
    rows of L tokens (one language per row), and m of them evenly spaced
    over the split. The held-out split is ordered by source block, so the
    first m lines would be one or two blocks of one package; spread rows
    sample every part of the split, and packing scores up to m x L real
    tokens instead of m mostly padded lines.

    Args:
      tasks: {language code: its task name}.
      split: 'validation', or another held-out split ('test').

    Returns:
      {code: {feature: int32 [n, L]}}.
    """
    missing = [c for c in tasks if (c, split) not in self._validation]
    if missing:
      if self.max_validation_examples is None:
        found = self._whole_split_rows(tasks, missing, split)
      else:
        found = {c: self._spread_rows(tasks[c], split) for c in missing}
      for code in missing:
        if not len(found[code][FEATURES[0]]):
          raise ValueError(
              f"Task {tasks[code]!r} has no {split} rows of "
              f"language {code!r}."
          )
        self._validation[code, split] = found[code]
    return {c: self._validation[c, split] for c in tasks}

  def _converted(self, dataset: tf.data.Dataset, pack: bool) -> Rows:
    length = {"targets": self.sequence_length}
    converter = pipeline.LanguageLMFeatureConverter(pack=pack)
    batches = [
        _keep(b)
        for b in converter(dataset, length).batch(256).as_numpy_iterator()
    ]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def _get(self, task_name: str, split: str) -> tf.data.Dataset:
    return seqio.get_mixture_or_task(task_name).get_dataset(
        {"targets": self.sequence_length}, split=split, shuffle=False,
        num_epochs=1,
    )

  def _whole_split_rows(self, tasks, missing, split) -> dict[str, Rows]:
    """Every listed language's split, one sequence per row, by language."""
    dataset = None
    for code in missing:
      ds = self._get(tasks[code], split)
      dataset = ds if dataset is None else dataset.concatenate(ds)
    rows = self._converted(dataset, pack=False)
    if self.pack:  # Same features as packed training rows: one segment.
      segment = (rows["decoder_loss_weights"] > 0).astype(np.int32)
      rows["decoder_segment_ids"] = segment
      rows["decoder_positions"] = segment * np.arange(
          self.sequence_length, dtype=np.int32
      )
    row_language = rows["decoder_language_ids"][:, 0]
    return {
        code: {
            k: v[row_language == languages.language_id(code)]
            for k, v in rows.items()
        }
        for code in missing
    }

  def _spread_rows(self, task_name: str, split: str) -> Rows:
    """At most max_validation_examples rows of one task, evenly spaced."""
    rows = self._converted(self._get(task_name, split), pack=self.pack)
    return {
        k: v[spread(len(v), self.max_validation_examples)]
        for k, v in rows.items()
    }


def spread(n: int, m: int) -> np.ndarray:
  """min(n, m) indices of range(n), evenly spaced, first and last included."""
  if m < 1:
    raise ValueError(f"max_validation_examples={m!r} must be >= 1.")
  if n <= m:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


def _from_arrays(batches: Rows) -> BatchesFn:
  """`batches(start)` over in-memory [S, P, rows, L] batches."""

  def batches_from(start: int) -> Iterator[Rows]:
    for step in range(start, len(batches[FEATURES[0]])):
      yield {k: v[step] for k, v in batches.items()}

  return batches_from
