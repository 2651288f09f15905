"""Result files written whole or not at all.

A table, report or plot goes to a temporary file next to its path that then
replaces it (`os.replace` is atomic on POSIX), so a killed run leaves either
the previous file or the new one, never half of one; on an error the
temporary file is removed. The file gets the permissions a plain `open`
would give it (0666 less the umask), not mkstemp's private 0600.
"""

import contextlib
import os
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def replacing(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block succeeds.

  Args:
    path: the file to write; its directory is created if missing.
    mode: 'w' (UTF-8 text, newlines written as given) or 'wb'.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r}; allowed: 'w', 'wb'.")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
  text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
  try:
    os.chmod(tmp, 0o666 & ~_umask())
    with os.fdopen(fd, mode, **text) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)  # The only way to read it is to set it.
  os.umask(mask)
  return mask


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically; a URL (gs://) goes through
  `tf.io.gfile`, written aside and renamed over the old file."""
  if "://" not in path:
    with replacing(path) as f:
      f.write(text)
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)
