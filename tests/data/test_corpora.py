"""The embedded corpora: shipped files, fixed splits, no straddling runs."""

import numpy as np
import pytest

from tiered_routing.data import corpora
from tiered_routing.tier1 import languages

DEBIAN16 = corpora.DEBIAN16
RUNS = corpora.DEBIAN16_RUNS


def _split_index(code):
  """Each debian16 line's split index, rebuilt from the split_lines."""
  lines = DEBIAN16.lines(code)
  index = np.full(len(lines), -1)
  cursor = {s: 0 for s in DEBIAN16.splits}
  parts = {s: DEBIAN16.split_lines(code, s) for s in DEBIAN16.splits}
  for i, line in enumerate(lines):
    for s, part in parts.items():
      if cursor[s] < len(part) and part[cursor[s]] == line:
        index[i] = DEBIAN16.splits.index(s)
        cursor[s] += 1
        break
  assert all(cursor[s] == len(parts[s]) for s in parts), code
  return index


def test_debian16_ships_every_language_with_its_readme_counts():
  counts = {c: len(DEBIAN16.lines(c)) for c in languages.CODES}
  # Counts from debian16/README.md.
  assert counts["en"] == 12829 and counts["ur"] == 1619
  assert counts["si"] == 1732 and sum(counts.values()) == 137568
  assert (DEBIAN16.directory / "SOURCES.tsv").exists()
  assert (DEBIAN16.directory / "LICENSES" / "MPL-2.0.txt").exists()


@pytest.mark.parametrize("code", languages.CODES)
def test_debian16_holds_out_whole_runs_inside_blocks(code):
  index = _split_index(code)  # Also: the splits partition the lines.
  for block in corpora.debian16_blocks()[code]:
    start, stop = block.first_line - 1, block.last_line
    runs = np.arange(stop - start) // RUNS.run_lines
    for run in np.unique(runs):
      in_run = index[start:stop][runs == run]
      assert len(set(in_run.tolist())) == 1, (code, block.source, run)
  # Both held-out splits are a tenth or less of the lines, never empty.
  for s in (1, 2):
    assert 100 <= (index == s).sum() <= 0.125 * len(index), (code, s)


def test_debian16_splits_change_only_at_run_or_block_boundaries():
  code = "en"
  index = _split_index(code)
  starts = {b.first_line - 1 for b in corpora.debian16_blocks()[code]}
  boundaries = {
      s + k * RUNS.run_lines
      for b in corpora.debian16_blocks()[code]
      for s in [b.first_line - 1]
      for k in range(b.lines // RUNS.run_lines + 1)
  } | starts
  changes = np.flatnonzero(index[1:] != index[:-1]) + 1
  assert changes.size > 50
  assert set(changes.tolist()) <= boundaries


def test_unknown_split_and_source_name_what_is_allowed():
  with pytest.raises(ValueError, match=r"'dev'.*\('train', 'validation'"):
    DEBIAN16.split_lines("en", "dev")
  with pytest.raises(ValueError, match=r"'mc4'; allowed: \('sample'"):
    corpora.of_source("mc4")
  with pytest.raises(ValueError, match="xx"):
    DEBIAN16.lines("xx")
