"""The vocabulary each source's tasks are registered with.

Each embedded corpus has a SentencePiece model trained on its own train
split (4096 pieces, byte fallback): `sample` uses UDHR-16's, `debian16`
its own. The mC4 sources default to UDHR-16's model, which is only good
for smoke runs: for mC4-scale runs set the environment variable
`TR_SPM_MODEL` before the task modules are imported, e.g. to the mT5
vocabulary (`MT5_SPM_MODEL`, 250k pieces) or to a model made by
`scripts/train_vocab.py`. `TR_SPM_MODEL` applies to every source, and the
model's `vocab_size` must match the gin macro VOCAB_SIZE.
"""

import functools
import os

import seqio

from tiered_routing.data import corpora

ENV_VAR = "TR_SPM_MODEL"
# The public mT5 vocabulary (Xue et al. 2021), for runs on the real mC4.
MT5_SPM_MODEL = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
# Sources without an embedded corpus of their own.
_DEFAULT_CORPUS = {"mc4": corpora.UDHR16, "mc4_json": corpora.UDHR16}


def default_model(source: str) -> str:
  """The SentencePiece model path of `source` when $TR_SPM_MODEL is unset."""
  if source in _DEFAULT_CORPUS:
    return _DEFAULT_CORPUS[source].vocab_path()
  return corpora.of_source(source).vocab_path()


@functools.cache
def get_vocabulary(source: str) -> seqio.SentencePieceVocabulary:
  """The vocabulary of `source`'s tasks: $TR_SPM_MODEL, else its default."""
  return seqio.SentencePieceVocabulary(
      os.environ.get(ENV_VAR) or default_model(source)
  )


def output_features(source: str) -> dict[str, seqio.Feature]:
  """LM output features: EOS-terminated targets and per-token language ids."""
  return {
      "targets": seqio.Feature(
          get_vocabulary(source), add_eos=True, dtype="int32"
      ),
      "language_ids": seqio.Feature(
          seqio.PassThroughVocabulary(size=0), add_eos=False, dtype="int32"
      ),
  }
