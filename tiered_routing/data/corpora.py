"""The embedded corpora, their fixed splits and their vocabularies.

Two corpora ship as package data, one UTF-8 file per language of the study,
one paragraph or sentence per line; each has a SentencePiece model trained
on its own train split (`scripts/train_vocab.py --corpus=...` rebuilds it).

  UDHR16    source 'sample': the Universal Declaration of Human Rights
            (udhr16/README.md), about 55k training tokens. Parallel text;
            every 6th paragraph is held out for validation, which holds out
            roughly, not exactly, the same articles in every language. A
            demo for the quickstart and the tests, not evidence.
  DEBIAN16  source 'debian16': 22.9 MB of real translated Debian
            documentation and interface sentences (debian16/README.md).
            Validation and test hold out runs of 50 consecutive lines
            inside each source block of SOURCES.tsv (every 10th run each;
            `source_blocks`), so near-duplicate neighbours never straddle
            two splits. Caveats: si, ur and kk have interface sentences
            only; several sources are the same documents translated and
            sampled differently per language, so a held-out line of one
            language can have its translation in another language's
            training split.
"""

import dataclasses
import functools
import pathlib
from typing import Callable

import numpy as np

from tiered_routing.data import source_blocks
from tiered_routing.tier1 import languages

_HERE = pathlib.Path(__file__).parent
# UDHR16: every VALIDATION_EVERY-th paragraph (counting from 1) is held out.
UDHR16_VALIDATION_EVERY = 6
DEBIAN16_RUNS = source_blocks.RunSplit(
    run_lines=50, every=10, offsets={"validation": 4, "test": 9}
)


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
  """One embedded corpus: files, fixed splits and vocabulary.

  Attributes:
    name: the directory under `tiered_routing/data/`.
    source: its SeqIO source name (tasks `tr.{source}.{lang}_v1`).
    splits: split names; index 0 is 'train'.
    assign_splits: (language code, its lines) -> int [lines], each line's
      index in `splits`.
  """

  name: str
  source: str
  splits: tuple[str, ...]
  assign_splits: Callable[[str, tuple[str, ...]], np.ndarray]

  @property
  def directory(self) -> pathlib.Path:
    return _HERE / self.name

  @property
  def vocab_file(self) -> pathlib.Path:
    return _HERE / f"{self.name}_spm.model"

  def lines(self, code: str) -> tuple[str, ...]:
    """All lines of language `code`, in file order."""
    languages.get(code)
    return _read_lines(self.directory / f"{code}.txt")

  def split_lines(self, code: str, split: str) -> tuple[str, ...]:
    """The lines of one split, in file order."""
    if split not in self.splits:
      raise ValueError(
          f"Unknown split {split!r} of {self.name}; allowed: {self.splits}"
      )
    return _split_lines(self, code)[self.splits.index(split)]

  def vocab_path(self) -> str:
    """Path of the SentencePiece model trained on the train split."""
    if not self.vocab_file.exists():
      raise FileNotFoundError(
          f"{self.vocab_file} is missing; rebuild it with "
          f"`python scripts/train_vocab.py --corpus={self.name}`"
      )
    return str(self.vocab_file)


@functools.cache
def _read_lines(path: pathlib.Path) -> tuple[str, ...]:
  text = path.read_text(encoding="utf-8")
  return tuple(line.strip() for line in text.splitlines() if line.strip())


@functools.cache
def _split_lines(
    corpus: EmbeddedCorpus, code: str
) -> tuple[tuple[str, ...], ...]:
  lines = corpus.lines(code)
  index = corpus.assign_splits(code, lines)
  return tuple(
      tuple(line for line, i in zip(lines, index) if i == s)
      for s in range(len(corpus.splits))
  )


def _every_sixth(code: str, lines: tuple[str, ...]) -> np.ndarray:
  del code
  position = np.arange(1, len(lines) + 1)
  return (position % UDHR16_VALIDATION_EVERY == 0).astype(np.int64)


@functools.cache
def debian16_blocks() -> dict[str, tuple[source_blocks.SourceBlock, ...]]:
  """SOURCES.tsv of debian16: language -> its source blocks."""
  return source_blocks.read_blocks(_HERE / "debian16" / "SOURCES.tsv")


def _debian16_runs(code: str, lines: tuple[str, ...]) -> np.ndarray:
  blocks = debian16_blocks()[code]
  source_blocks.check_coverage(code, blocks, len(lines))
  return source_blocks.assign(blocks, DEBIAN16_RUNS)


UDHR16 = EmbeddedCorpus(
    name="udhr16",
    source="sample",
    splits=("train", "validation"),
    assign_splits=_every_sixth,
)
DEBIAN16 = EmbeddedCorpus(
    name="debian16",
    source="debian16",
    splits=DEBIAN16_RUNS.split_names,
    assign_splits=_debian16_runs,
)
CORPORA = (UDHR16, DEBIAN16)


def of_source(source: str) -> EmbeddedCorpus:
  """The embedded corpus of a SeqIO source ('sample' or 'debian16')."""
  for corpus in CORPORA:
    if corpus.source == source:
      return corpus
  allowed = tuple(c.source for c in CORPORA)
  raise ValueError(
      f"No embedded corpus for source {source!r}; allowed: {allowed}"
  )
