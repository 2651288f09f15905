"""Evaluation data: whole SeqIO splits, once each, laid out by partition.

Evaluation reads every example of a split exactly once (no shuffling, no
repetition, no sampling), unlike training streams. `partition_blocks` gives
the per-language evaluator its rows: block p holds partition p's tasks, as
[rows, L] batches padded with all-zero rows (loss weight 0), so that each
language is scored by its own tier-1 partition. `split_batches` reads any
set of tasks in one pipeline; `train_texts` gives the raw documents a text
classifier is fit on.
"""

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio

from tiered_routing.data import feature_rows
from tiered_routing.data import pipeline
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes


def tasks_of(names: str | Sequence[str]) -> list[seqio.Task]:
  """The tasks of one or more mixtures or tasks, in order, each once."""
  names = [names] if isinstance(names, str) else list(names)
  out, seen = [], set()
  for name in names:
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(name)):
      if task.name not in seen:
        seen.add(task.name)
        out.append(task)
  return out


def vocabulary_of(name: str) -> seqio.Vocabulary:
  """The targets vocabulary of a task or mixture (for bytes and decoding)."""
  return tasks_of(name)[0].output_features["targets"].vocabulary


def check_split(task: seqio.Task, split: str) -> None:
  if split not in task.splits:
    raise ValueError(
        f"Task {task.name!r} has no split {split!r}; it has "
        f"{list(task.splits)}."
    )


def split_batches(
    names: str | Sequence[str],
    length: int,
    rows: int,
    split: str = "validation",
    pack: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example of the tasks' `split` once, in [<=rows, L] batches.

  One converter for all tasks: packing may put two languages in one row,
  which the per-token language ids keep apart. Unpacked: one example per row.
  """
  dataset = None
  for task in tasks_of(names):
    check_split(task, split)
    ds = task.get_dataset(
        {"targets": length}, split=split, shuffle=False, num_epochs=1
    )
    dataset = ds if dataset is None else dataset.concatenate(ds)
  converter = pipeline.LanguageLMFeatureConverter(pack=pack)
  dataset = converter(dataset, {"targets": length})
  yield from dataset.batch(rows).as_numpy_iterator()


def partition_blocks(
    names: Sequence[str],
    length: int,
    rows: int,
    split: str = "validation",
    pack: bool = True,
) -> list[Iterator[dict[str, np.ndarray]]]:
  """One stream of [rows, L] batches per partition: its mixture's split.

  Args:
    names: one task or mixture per partition, in partition order.
    length: L.
    rows: rows per batch (the last batch is padded with zero rows).
    split: the split to read.
    pack: pack several sequences per row (the train binary's layout).
  """
  return [
      (
          feature_rows.pad_rows(b, rows)
          for b in split_batches(name, length, rows, split, pack)
      )
      for name in names
  ]


def train_texts(
    names: str | Sequence[str], max_docs: int, split: str = "train"
) -> dict[str, list[str]]:
  """Up to `max_docs` whole documents of `split` per language."""
  out = {}
  for task in tasks_of(names):
    check_split(task, split)
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    for ex in ds.take(max_docs).as_numpy_iterator():
      code = languages.CODES[int(ex[pipeline.LANGUAGE_IDS][0])]
      docs = out.setdefault(code, [])
      if len(docs) < max_docs:
        docs.append(ex["targets_pretokenized"].decode("utf-8"))
  return out


def language_blocks(
    rows_by_language: Mapping[str, Mapping[str, np.ndarray]],
    scheme: schemes.PartitionScheme,
    rows_per_batch: int,
) -> list[list[feature_rows.Rows]]:
  """Per partition of `scheme`, its languages' rows cut into [B, L] batches.

  Args:
    rows_by_language: {code: {feature: [n, L]}} for all 16 languages, one
      sequence per row (`stream_cache.DataCache.validation_rows`).
    scheme: which partition scores which language.
    rows_per_batch: B (the last batch of a partition is zero-padded).
  """
  if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
    raise ValueError(f"rows_per_batch={rows_per_batch!r} must be an int >= 1.")
  missing = [c for c in languages.CODES if c not in rows_by_language]
  if missing:
    raise ValueError(f"No validation rows for languages {missing}.")
  out = []
  for codes in scheme.partitions:
    keys = rows_by_language[codes[0]]
    joined = {
        k: np.concatenate([rows_by_language[c][k] for c in codes])
        for k in keys
    }
    out.append(feature_rows.chunk_rows(joined, rows_per_batch))
  return out
