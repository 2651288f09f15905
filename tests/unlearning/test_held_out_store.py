"""The sweep's held-out rows on disk (`unlearning.held_out_store`)."""

import os

import numpy as np
import pytest

from tiered_routing.unlearning import held_out_store


def _rows(seed):
  rng = np.random.default_rng(seed)
  return {
      "decoder_target_tokens": rng.integers(0, 4096, (3, 8), np.int32),
      "decoder_loss_weights": np.ones((3, 8), np.int32),
  }


def test_rows_written_by_one_process_are_read_by_another(tmp_path):
  directory = str(tmp_path / "held_out_rows" / "length8_rows3")
  writer = held_out_store.HeldOutRows(directory)
  assert ("ur", "test") not in writer and len(writer) == 0
  with pytest.raises(KeyError):
    writer["ur", "test"]  # pylint: disable=pointless-statement
  writer["ur", "test"] = _rows(0)
  writer["de", "validation"] = _rows(1)

  reader = held_out_store.HeldOutRows(directory)  # Another process's view.
  assert ("ur", "test") in reader and ("ur", "validation") not in reader
  assert list(reader) == [("de", "validation"), ("ur", "test")]
  for key, seed in ((("ur", "test"), 0), (("de", "validation"), 1)):
    got = reader[key]
    assert set(got) == set(_rows(seed))
    for name, value in _rows(seed).items():
      assert got[name].dtype == np.int32
      np.testing.assert_array_equal(got[name], value)
  assert sorted(os.listdir(directory)) == [
      "test.ur.npz", "validation.de.npz"]  # No temporary file is left.

  del reader["ur", "test"]
  assert ("ur", "test") not in held_out_store.HeldOutRows(directory)
  with pytest.raises(KeyError):
    del reader["ur", "test"]
  assert ("ur",) not in reader and "ur" not in reader


def test_a_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch):
  """A killed or failing writer must not leave half an .npz that a later
  process would read as rows."""
  def full_disk(f, **arrays):
    del arrays
    f.write(b"PK\x03\x04 half an npz")
    raise OSError("No space left on device")

  store = held_out_store.HeldOutRows(str(tmp_path))
  monkeypatch.setattr(held_out_store.np, "savez", full_disk)
  with pytest.raises(OSError, match="No space"):
    store["ur", "test"] = _rows(0)
  assert ("ur", "test") not in store
  assert not os.listdir(tmp_path)
