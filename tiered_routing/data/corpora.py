"""The embedded UDHR-16 sample corpus and its SentencePiece vocabulary.

The corpus is the Universal Declaration of Human Rights in the 16 languages of
the study, one paragraph per line (see udhr16/README.md for provenance). The
text is parallel, though translations break paragraphs slightly differently
(59 to 61 per language), so the fixed split below holds out roughly, not
exactly, the same articles in every language.
"""

import functools
import pathlib

from tiered_routing.tier1 import languages

CORPUS_DIR = pathlib.Path(__file__).parent / "udhr16"
VOCAB_PATH = pathlib.Path(__file__).parent / "udhr16_spm.model"
SPLITS = ("train", "validation")
# Every VALIDATION_EVERY-th paragraph (counting from 1) is held out: about a
# sixth of the corpus, spread over the whole declaration.
VALIDATION_EVERY = 6


@functools.cache
def paragraphs(code: str) -> tuple[str, ...]:
  """All non-empty paragraphs of language `code`, in corpus order."""
  languages.get(code)
  text = (CORPUS_DIR / f"{code}.txt").read_text(encoding="utf-8")
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def split_paragraphs(code: str, split: str) -> tuple[str, ...]:
  """The deterministic train/validation split of one language."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; allowed: {SPLITS}")
  held_out = split == "validation"
  return tuple(
      p
      for i, p in enumerate(paragraphs(code))
      if ((i + 1) % VALIDATION_EVERY == 0) == held_out
  )


def vocab_path() -> str:
  """Path of the SentencePiece model trained on the train split."""
  if not VOCAB_PATH.exists():
    raise FileNotFoundError(
        f"{VOCAB_PATH} is missing; rebuild it with "
        "`python scripts/train_vocab.py`"
    )
  return str(VOCAB_PATH)
