"""Held-out rows of the sweep's DataCache: whole splits, or a packed sample
spread over the split."""

import numpy as np
import pytest

import tasks  # pylint: disable=unused-import  (registers the SeqIO tasks)
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.tier1 import languages

LENGTH = 128


def test_spread_golden():
  np.testing.assert_array_equal(stream_cache.spread(10, 4), [0, 3, 6, 9])
  np.testing.assert_array_equal(stream_cache.spread(3, 5), [0, 1, 2])
  np.testing.assert_array_equal(stream_cache.spread(5, 1), [0])
  for n, m in ((65, 64), (530, 64), (1000, 999)):
    picked = stream_cache.spread(n, m)
    assert len(picked) == m and picked[0] == 0 and picked[-1] == n - 1
  with pytest.raises(ValueError, match="max_validation_examples=0"):
    stream_cache.spread(3, 0)


def _real_tokens(rows):
  """Sorted targets of every scored token."""
  weights = rows["decoder_loss_weights"] > 0
  return np.sort(rows["decoder_target_tokens"][weights])


@pytest.mark.parametrize("code", ["ur", "zh"])
def test_limited_rows_are_packed_one_language_and_spread(code):
  task = {code: seqio_names.task_name("debian16", code)}
  whole = stream_cache.DataCache(LENGTH).validation_rows(task)[code]
  packed_all = stream_cache.DataCache(
      LENGTH, max_validation_examples=10_000
  ).validation_rows(task)[code]
  sample = stream_cache.DataCache(
      LENGTH, max_validation_examples=3
  ).validation_rows(task)[code]

  # Packing keeps every scored token of the split, in fewer rows.
  np.testing.assert_array_equal(_real_tokens(packed_all), _real_tokens(whole))
  n = len(packed_all["decoder_input_tokens"])
  assert n < len(whole["decoder_input_tokens"])
  assert packed_all["decoder_segment_ids"].max() >= 2
  # Every row holds the one language.
  ids = sample["decoder_language_ids"][sample["decoder_loss_weights"] > 0]
  assert set(ids.tolist()) == {languages.language_id(code)}
  # The sample is the first, middle and last packed row, not the first 3.
  assert n > 3
  middle = int(np.round((n - 1) / 2))
  for k, v in sample.items():
    np.testing.assert_array_equal(v, packed_all[k][[0, middle, n - 1]])


def test_packed_rows_start_every_segment_from_bos():
  """The n-gram baselines read a token's context from the input tokens, so
  a packed row must not carry one sequence's last token into the next."""
  task = {"ur": seqio_names.task_name("debian16", "ur")}
  rows = stream_cache.DataCache(
      LENGTH, max_validation_examples=10_000
  ).validation_rows(task)["ur"]
  starts = (rows["decoder_positions"] == 0) & (rows["decoder_segment_ids"] > 0)
  assert starts.sum() > len(rows["decoder_positions"])  # Packed.
  np.testing.assert_array_equal(rows["decoder_input_tokens"][starts], 0)


def test_caches_of_two_seeds_share_one_held_out_store(monkeypatch):
  """Held-out rows do not depend on the data seed: a second cache given
  the first one's store reads its rows instead of building them again."""
  task = {"ur": seqio_names.task_name("sample", "ur")}
  store = {}
  first = stream_cache.DataCache(
      16, seed=0, max_validation_examples=4, held_out=store
  ).validation_rows(task)["ur"]
  assert list(store) == [("ur", "validation")]

  def must_not_build(*args):
    raise AssertionError(f"rebuilt held-out rows {args}")

  second = stream_cache.DataCache(
      16, seed=1000, max_validation_examples=4, held_out=store)
  monkeypatch.setattr(second, "_spread_rows", must_not_build)
  for k, v in second.validation_rows(task)["ur"].items():
    np.testing.assert_array_equal(v, first[k], err_msg=k)
  with pytest.raises(AssertionError, match="rebuilt"):  # A new split builds.
    second.validation_rows(task, split="test")
