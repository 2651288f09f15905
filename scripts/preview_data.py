r"""Prints one batch of the all-16 mixture and one of a family partition.

  python scripts/preview_data.py --source=sample --scheme=family \
      --num_partitions=4

Shows the packed features with their per-token language ids, the tier-1
partition each row's languages belong to under the scheme, decoded text of
the first sequences, and the [P, B/P, L] partitioned layout: block p holds
only partition p's languages.
"""

from absl import app
from absl import flags
from absl import logging
import numpy as np

import tasks  # pylint: disable=unused-import  (registers tasks)
from tasks import vocab
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

_SOURCE = flags.DEFINE_enum("source", "sample", seqio_names.SOURCES, "Source.")
_SCHEME = flags.DEFINE_enum(
    "scheme", "family", schemes.SCHEME_KINDS[:3], "Partition scheme."
)
_N = flags.DEFINE_integer("num_partitions", 4, "Partitions of the scheme.")
_LENGTH = flags.DEFINE_integer("length", 32, "Packed row length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")


def _partitions_of(language_ids, scheme) -> np.ndarray:
  """The tier-1 partition of every token's language under `scheme`."""
  return scheme.language_to_partition_table()[language_ids]


def _show(title: str, batch, scheme) -> None:
  print(f"== {title}")
  for key, value in sorted(batch.items()):
    print(f"{key:24s} {str(value.shape):14s} {value.reshape(-1)[:12]}")
  rows = batch["decoder_target_tokens"].reshape(-1, _LENGTH.value)
  lang_ids = batch["decoder_language_ids"].reshape(rows.shape)
  weights = batch["decoder_loss_weights"].reshape(rows.shape)
  for r in range(min(4, rows.shape[0])):
    used = weights[r] > 0
    langs = sorted({languages.CODES[i] for i in lang_ids[r][used]})
    parts = sorted(set(_partitions_of(lang_ids[r][used], scheme).tolist()))
    text = vocab.get_vocabulary(_SOURCE.value).decode(rows[r][used].tolist())
    print(f"row {r}: languages={langs} partitions={parts} text={text[:60]!r}")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # SeqIO's per-task caching notes.
  scheme = schemes.make_scheme(_SCHEME.value, _N.value)
  common = dict(sequence_length=_LENGTH.value, shuffle=True, seed=0)
  ds = pipeline.get_dataset(
      seqio_names.all_languages_mixture(_SOURCE.value),
      batch_size=_BATCH.value,
      **common,
  )
  _show(
      f"all 16 languages ({scheme.name} partitions)",
      next(iter(pipeline.batch_iterator(ds))),
      scheme,
  )
  names = seqio_names.partition_mixture_names(_SOURCE.value, scheme)
  print(f"partitions of {scheme.name}: {[list(m) for m in scheme.partitions]}")
  pds = pipeline.partitioned_dataset(
      names, global_batch_size=_BATCH.value, **common
  )
  batch = next(iter(pipeline.batch_iterator(pds)))
  _show(
      f"partitioned [P, B/P, L] = {batch['decoder_target_tokens'].shape}",
      batch,
      scheme,
  )
  per_block = [
      np.unique(
          _partitions_of(
              batch["decoder_language_ids"][p][
                  batch["decoder_loss_weights"][p] > 0
              ],
              scheme,
          )
      ).tolist()
      for p in range(scheme.num_partitions)
  ]
  print(f"partition of every scored token, per block: {per_block}")


if __name__ == "__main__":
  app.run(main)
