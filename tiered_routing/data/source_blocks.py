"""Source blocks of a corpus file, and held-out splits by runs of lines.

A file of the debian16 corpus is a sequence of source blocks (SOURCES.tsv:
one row per block with its package, kind and licence), each a contiguous
range of lines in document order. Neighbouring lines are often near
copies (interface strings that differ in one word, list items, the
sections of one manual page), so a line-by-line split would put a
validation line's near twin in the training set. Held-out lines are
therefore whole runs of `run_lines` consecutive lines inside one block:
runs are counted from each block's first line, and run r is held out for
a split when r % every equals that split's offset. No run straddles two
blocks, and no two splits share a run.
"""

import csv
import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

_INT_FIELDS = ("first_line", "last_line", "lines", "chars", "bytes")


@dataclasses.dataclass(frozen=True)
class SourceBlock:
  """One row of SOURCES.tsv: lines first_line..last_line (1-based,
  inclusive) of `language`'s file come from `source`."""

  language: str
  source: str
  package: str
  version: str
  first_line: int
  last_line: int
  lines: int
  chars: int
  bytes: int
  kind: str
  license: str


@dataclasses.dataclass(frozen=True)
class RunSplit:
  """Which runs of lines each held-out split takes.

  Attributes:
    run_lines: lines per run.
    every: one run in `every` goes to each held-out split.
    offsets: held-out split name -> its run offset in [0, every); runs
      at no offset are training runs.
  """

  run_lines: int
  every: int
  offsets: Mapping[str, int]

  def __post_init__(self):
    if self.run_lines < 1 or self.every < 1:
      raise ValueError(
          f"run_lines={self.run_lines}, every={self.every}; allowed: >= 1."
      )
    offsets = list(self.offsets.values())
    if len(set(offsets)) != len(offsets) or not all(
        0 <= o < self.every for o in offsets
    ):
      raise ValueError(
          f"offsets={dict(self.offsets)}; allowed: distinct values in "
          f"[0, {self.every})."
      )

  @property
  def split_names(self) -> tuple[str, ...]:
    """'train' first, then the held-out splits (the index `assign` uses)."""
    return ("train", *self.offsets)


def read_blocks(path: pathlib.Path) -> dict[str, tuple[SourceBlock, ...]]:
  """SOURCES.tsv as language -> its blocks in line order."""
  out: dict[str, list[SourceBlock]] = {}
  with open(path, encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f, delimiter="\t"):
      fields = {
          k.strip(): int(v) if k.strip() in _INT_FIELDS else v
          for k, v in row.items()
      }
      fields["language"] = fields.pop("lang")
      block = SourceBlock(**fields)
      out.setdefault(block.language, []).append(block)
  return {
      code: tuple(sorted(blocks, key=lambda b: b.first_line))
      for code, blocks in out.items()
  }


def check_coverage(
    code: str, blocks: Sequence[SourceBlock], num_lines: int
) -> None:
  """Raises ValueError unless `blocks` tile lines 1..num_lines exactly."""
  expected = 1
  for block in blocks:
    if block.first_line != expected or block.last_line < block.first_line:
      raise ValueError(
          f"{code}: block {block.source!r} covers lines "
          f"{block.first_line}-{block.last_line}; expected it to start at "
          f"line {expected} (blocks must tile the file without gaps)."
      )
    expected = block.last_line + 1
  if expected - 1 != num_lines:
    raise ValueError(
        f"{code}: the blocks cover lines 1-{expected - 1} but the file has "
        f"{num_lines} lines."
    )


def assign(blocks: Sequence[SourceBlock], split: RunSplit) -> np.ndarray:
  """int [lines]: each line's index in `split.split_names` (0 = train)."""
  index = {o: i + 1 for i, o in enumerate(split.offsets.values())}
  out = []
  for block in blocks:
    runs = np.arange(block.last_line - block.first_line + 1) // split.run_lines
    out.append(np.array([index.get(r % split.every, 0) for r in runs]))
  return np.concatenate(out).astype(np.int64)
