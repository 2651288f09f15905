"""The vocabulary every task of this package is registered with.

Default: the SentencePiece model trained on the embedded UDHR-16 train split
(4096 pieces, byte fallback). For mC4-scale runs set the environment variable
`TR_SPM_MODEL` to another model before the task modules are imported, e.g.
the mT5 vocabulary (`MT5_SPM_MODEL`, 250k pieces) or one made by
`scripts/train_vocab.py`; the model's `vocab_size` must match (gin macro
VOCAB_SIZE).
"""

import functools
import os

import seqio

from tiered_routing.data import corpora

ENV_VAR = "TR_SPM_MODEL"
# The public mT5 vocabulary (Xue et al. 2021), for runs on the real mC4.
MT5_SPM_MODEL = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"


@functools.cache
def get_vocabulary() -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary named by $TR_SPM_MODEL, else the sample's."""
  return seqio.SentencePieceVocabulary(
      os.environ.get(ENV_VAR) or corpora.vocab_path()
  )


def output_features() -> dict[str, seqio.Feature]:
  """LM output features: EOS-terminated targets and per-token language ids."""
  return {
      "targets": seqio.Feature(get_vocabulary(), add_eos=True, dtype="int32"),
      "language_ids": seqio.Feature(
          seqio.PassThroughVocabulary(size=0), add_eos=False, dtype="int32"
      ),
  }
