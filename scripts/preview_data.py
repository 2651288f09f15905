r"""Prints one batch of the all-16 mixture and one of a family partition.

  python scripts/preview_data.py --source=sample --scheme=family --num_partitions=4

Shows the packed features with their per-token language and partition ids,
decoded text of the first sequence, and the [P, B/P, L] partitioned layout.
"""

from absl import app
from absl import flags
from absl import logging
import numpy as np

import tasks  # pylint: disable=unused-import  (registers tasks)
from tasks import mixtures
from tasks import vocab
from tiered_routing.data import inputs
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

_SOURCE = flags.DEFINE_enum("source", "sample", mixtures.SOURCES, "Source.")
_SCHEME = flags.DEFINE_enum(
    "scheme", "family", schemes.SCHEME_KINDS[:3], "Partition scheme."
)
_N = flags.DEFINE_integer("num_partitions", 4, "Partitions of the scheme.")
_LENGTH = flags.DEFINE_integer("length", 32, "Packed row length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")


def _show(title: str, batch) -> None:
  print(f"== {title}")
  for key, value in sorted(batch.items()):
    print(f"{key:24s} {str(value.shape):14s} {value.reshape(-1)[:12]}")
  rows = batch["decoder_target_tokens"].reshape(-1, _LENGTH.value)
  lang_ids = batch["decoder_language_ids"].reshape(rows.shape)
  part_ids = batch["decoder_partition_ids"].reshape(rows.shape)
  weights = batch["decoder_loss_weights"].reshape(rows.shape)
  for r in range(min(4, rows.shape[0])):
    used = weights[r] > 0
    langs = sorted({languages.CODES[i] for i in lang_ids[r][used]})
    parts = sorted(set(part_ids[r][used].tolist()))
    text = vocab.get_vocabulary().decode(rows[r][used].tolist())
    print(
        f"row {r}: languages={langs} partitions={parts} " f"text={text[:60]!r}"
    )


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # SeqIO's per-task caching notes.
  scheme = schemes.make_scheme(_SCHEME.value, _N.value)
  common = dict(
      scheme=scheme, sequence_length=_LENGTH.value, shuffle=True, seed=0
  )
  ds = inputs.get_dataset(
      mixtures.all_languages_mixture(_SOURCE.value),
      batch_size=_BATCH.value,
      **common,
  )
  _show(
      f"all 16 languages ({scheme.name} ids)",
      next(iter(inputs.batch_iterator(ds))),
  )
  names = mixtures.partition_mixture_names(_SOURCE.value, scheme)
  print(
      f"partitions of {scheme.name}: " f"{[list(m) for m in scheme.partitions]}"
  )
  pds = inputs.partitioned_dataset(
      names, global_batch_size=_BATCH.value, **common
  )
  batch = next(iter(inputs.batch_iterator(pds)))
  _show(
      f"partitioned [P, B/P, L] = " f"{batch['decoder_target_tokens'].shape}",
      batch,
  )
  per_block = [
      np.unique(
          batch["decoder_partition_ids"][p][
              batch["decoder_loss_weights"][p] > 0
          ]
      ).tolist()
      for p in range(scheme.num_partitions)
  ]
  print(f"partition ids per block: {per_block}")


if __name__ == "__main__":
  app.run(main)
