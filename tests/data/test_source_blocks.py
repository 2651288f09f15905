"""Source blocks and held-out runs: golden values by hand, and errors."""

import numpy as np
import pytest

from tiered_routing.data import source_blocks


def _block(first, last, source="s"):
  return source_blocks.SourceBlock(
      language="ur",
      source=source,
      package="p",
      version="1",
      first_line=first,
      last_line=last,
      lines=last - first + 1,
      chars=0,
      bytes=0,
      kind="ui",
      license="MPL-2.0",
  )


def test_runs_restart_in_every_block():
  split = source_blocks.RunSplit(
      run_lines=2, every=3, offsets={"validation": 1, "test": 2}
  )
  assert split.split_names == ("train", "validation", "test")
  blocks = [_block(1, 9, "a"), _block(10, 14, "b")]
  # Block a: runs 0 0 1 1 2 2 3 3 4 -> offsets 0 0 1 1 2 2 0 0 1.
  # Block b restarts at run 0: runs 0 0 1 1 2 -> offsets 0 0 1 1 2.
  expected = [0, 0, 1, 1, 2, 2, 0, 0, 1, 0, 0, 1, 1, 2]
  np.testing.assert_array_equal(source_blocks.assign(blocks, split), expected)


def test_read_blocks_parses_the_tsv(tmp_path):
  path = tmp_path / "SOURCES.tsv"
  path.write_text(
      "lang\tsource\tpackage\tversion\tfirst_line\tlast_line\tlines\tchars"
      "\tbytes\tkind\tlicense\n"
      "ur\tchromium-ui\tc\t2\t4\t5\t2\t60\t90\tui\tBSD-3-Clause\n"
      "ur\tfirefox-ui\tf\t1\t1\t3\t3\t80\t120\tui\tMPL-2.0\n"
      "en\tmanpages\tm\t6\t1\t1\t1\t30\t30\tprose\tGPL-2.0+\n",
      encoding="utf-8",
  )
  blocks = source_blocks.read_blocks(path)
  assert [b.source for b in blocks["ur"]] == ["firefox-ui", "chromium-ui"]
  assert blocks["ur"][1].first_line == 4 and blocks["ur"][1].bytes == 90
  assert blocks["en"][0].kind == "prose"


@pytest.mark.parametrize(
    "blocks, num_lines, message",
    [
        ([_block(1, 3), _block(5, 6)], 6, "expected it to start at line 4"),
        ([_block(1, 3), _block(3, 6)], 6, "expected it to start at line 4"),
        ([_block(2, 6)], 6, "expected it to start at line 1"),
        ([_block(1, 3)], 5, "the blocks cover lines 1-3 but the file has 5"),
    ],
)
def test_coverage_errors_name_the_block_and_the_lines(
    blocks, num_lines, message
):
  with pytest.raises(ValueError, match=message):
    source_blocks.check_coverage("ur", blocks, num_lines)


def test_coverage_accepts_an_exact_tiling():
  source_blocks.check_coverage("ur", [_block(1, 3), _block(4, 6)], 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(run_lines=0, every=10, offsets={}), "run_lines=0"),
        (dict(run_lines=5, every=10, offsets={"a": 1, "b": 1}), "distinct"),
        (dict(run_lines=5, every=10, offsets={"a": 10}), r"\[0, 10\)"),
    ],
)
def test_bad_run_splits_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    source_blocks.RunSplit(**kwargs)
