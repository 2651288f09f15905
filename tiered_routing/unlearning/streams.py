"""SeqIO data of an unlearning experiment, materialised once as NumPy arrays.

A trade-off sweep trains and unlearns many small models on the same few
SeqIO streams: the original and the reference model of a configuration share
every partition's stream but one, configurations with the same scheme and
batch share all of them, and every configuration evaluates the same
per-language validation sets. Building a SeqIO pipeline costs seconds per task
(on a 2-core CPU more than the training steps it feeds), so `DataCache` builds
each stream once and keeps its batches.

Streams are exactly what the trainer's input pipeline yields: partition q of
a `[P, B/P, L]` batch is `inputs.get_dataset(name_q, batch_size=B/P,
seed=seed + q)`, the stream `inputs.partitioned_dataset` zips, so a model
trained on `DataCache.partitioned` batches sees the batches the `train` binary
would. The 'decoder_partition_ids' feature is dropped: the model never reads it
(tier 1 is the batch layout itself), and without it a stream does not depend
on the partition scheme, so configurations with different schemes share it.

A partition without data (its only language was forgotten) is given as None
and gets all-zero rows: loss weight 0, so it contributes nothing.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import numpy as np

from tiered_routing import inputs
from tiered_routing import partitions
from tiered_routing import trainer

Rows = dict[str, np.ndarray]  # feature -> [..., L] int32 arrays
FEATURES = trainer.MODEL_FEATURES
# Only the feature converter reads the scheme, to fill the dropped
# 'decoder_partition_ids'; any valid scheme gives the same kept features.
_ANY_SCHEME = partitions.per_language()


def _keep(batch: Mapping[str, np.ndarray]) -> Rows:
  return {k: np.asarray(batch[k], np.int32) for k in FEATURES}


def zeros_like(rows: Rows) -> Rows:
  return {k: np.zeros_like(v) for k, v in rows.items()}


def stack(parts: Sequence[Rows], axis: int) -> Rows:
  return {k: np.stack([p[k] for p in parts], axis=axis) for k in parts[0]}


def scored_tokens(rows: Rows) -> int:
  """Tokens with a non-zero loss weight (what a step actually trains on)."""
  return int(np.sum(rows["decoder_loss_weights"] > 0))


class DataCache:
  """Builds each SeqIO stream once and keeps its batches in memory.

  Args:
    sequence_length: L, the packed row length.
    seed: data seed; partition q's training stream uses seed + q, as in
      `inputs.partitioned_dataset`.
    pack: pack several sequences per row.
  """

  def __init__(self, sequence_length: int, seed: int = 0, pack: bool = True):
    if sequence_length < 2:
      raise ValueError(f"sequence_length={sequence_length!r} must be >= 2.")
    self.sequence_length = sequence_length
    self.seed = seed
    self.pack = pack
    self._streams: dict[tuple, Rows] = {}
    self._validation: dict[str, Rows] = {}

  def stream(self, name: str, seed: int, rows: int, num_batches: int) -> Rows:
    """The first `num_batches` [rows, L] training batches of one stream.

    Returns:
      {feature: int32 [num_batches, rows, L]}.
    """
    if rows < 1 or num_batches < 1:
      raise ValueError(f"Need rows >= 1 and num_batches >= 1, got rows="
                       f"{rows!r}, num_batches={num_batches!r}.")
    key = (name, seed, rows)
    cached = self._streams.get(key)
    if cached is None or len(cached[FEATURES[0]]) < num_batches:
      dataset = inputs.get_dataset(
          name, scheme=_ANY_SCHEME, sequence_length=self.sequence_length,
          batch_size=rows, seed=seed, pack=self.pack)
      batches = [_keep(b) for b in dataset.take(num_batches)
                 .as_numpy_iterator()]
      cached = stack(batches, axis=0)
      self._streams[key] = cached
    return {k: v[:num_batches] for k, v in cached.items()}

  def partitioned(self, names: Sequence[Optional[str]], rows: int,
                  num_batches: int) -> Rows:
    """Training batches of one stream per partition (None = no data).

    Returns:
      {feature: int32 [num_batches, P, rows, L]}; batch s is the batch
      `inputs.partitioned_dataset(names, ...)` yields at step s.
    """
    parts = [None if n is None else
             self.stream(n, self.seed + q, rows, num_batches)
             for q, n in enumerate(names)]
    template = next((p for p in parts if p is not None), None)
    if template is None:
      raise ValueError(f"No partition has data: names={list(names)}.")
    return stack([zeros_like(template) if p is None else p for p in parts],
                 axis=1)

  def validation_rows(self, task: str) -> Rows:
    """All validation rows of one task, packed: {feature: [n, L]}."""
    if task not in self._validation:
      dataset = inputs.get_dataset(
          task, scheme=_ANY_SCHEME, sequence_length=self.sequence_length,
          batch_size=1, split="validation", shuffle=False, num_epochs=1,
          pack=self.pack)
      batches = [_keep(b) for b in dataset.as_numpy_iterator()]
      if not batches:
        raise ValueError(f"Task {task!r} has no validation data.")
      self._validation[task] = {k: np.concatenate([b[k] for b in batches])
                                for k in FEATURES}
    return self._validation[task]


def batches_fn(batches: Rows):
  """`trainer.train`'s `batches(start)` over cached [S, P, rows, L] batches."""

  def batches_from(start: int) -> Iterator[Rows]:
    for step in range(start, len(batches[FEATURES[0]])):
      yield {k: v[step] for k, v in batches.items()}

  return batches_from


def rechunk(rows: Rows, rows_per_batch: int, num_batches: int) -> Rows:
  """Regroups [..., R0, L] batches into `num_batches` of `rows_per_batch`.

  The rows keep their order and are reused cyclically when there are fewer
  than needed (an unlearning loop may run longer than one pass over a small
  retain set).

  Args:
    rows: {feature: [S, R0, L]} (e.g. one partition's training batches).
    rows_per_batch: R of the result.
    num_batches: N of the result.

  Returns:
    {feature: [N, R, L]}.
  """
  out = {}
  for key, value in rows.items():
    flat = value.reshape(-1, value.shape[-1])
    index = np.arange(num_batches * rows_per_batch) % len(flat)
    out[key] = flat[index].reshape(num_batches, rows_per_batch, -1)
  return out


def chunk_rows(rows: Rows, rows_per_batch: int) -> list[Rows]:
  """Cuts [n, L] rows into [R, L] batches, the last padded with zero rows."""
  n = len(rows[FEATURES[0]])
  out = []
  for start in range(0, n, rows_per_batch):
    batch = {k: v[start:start + rows_per_batch] for k, v in rows.items()}
    pad = rows_per_batch - len(batch[FEATURES[0]])
    out.append({k: np.pad(v, [(0, pad), (0, 0)]) for k, v in batch.items()})
  return out
