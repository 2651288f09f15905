"""Result files are written whole or not at all, readable like any file."""

import os
import stat

import pytest

from tiered_routing.train import atomic_file


def test_file_replaced_whole_and_kept_on_error(tmp_path):
  path = str(tmp_path / "sub" / "results.csv")
  atomic_file.write_text(path, "a,b\n1,2\n")
  with pytest.raises(RuntimeError):
    with atomic_file.replacing(path) as f:
      f.write("half")
      raise RuntimeError("killed mid-write")
  with open(path) as f:
    assert f.read() == "a,b\n1,2\n"
  assert os.listdir(tmp_path / "sub") == ["results.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask_not_mkstemp(tmp_path, umask):
  """Result files used to be created 0600 (mkstemp's), unreadable to the
  rest of a group sharing the results."""
  previous = os.umask(umask)
  try:
    path = str(tmp_path / "pareto.png")
    with atomic_file.replacing(path, "wb") as f:
      f.write(b"\x89PNG")
  finally:
    os.umask(previous)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
