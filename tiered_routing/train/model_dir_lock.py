"""A lock file that refuses a second job writing the same model directory."""

import atexit
import os
import socket
import time
from typing import Optional

from absl import logging
import jax


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by another user.
    return True
  return True


class ModelDirLock:
  """Refuses a second job writing the same MODEL_DIR.

  Two trainers on one directory would interleave checkpoints and corrupt the
  resume logic. The lock is a file created atomically (`O_CREAT | O_EXCL`)
  holding `pid@hostname`. A lock left by a dead process on this host is taken
  over with a warning; a lock from another host cannot be checked and must be
  removed by hand. Only process 0 of a multi-host job takes it, and only on
  local filesystems (O_EXCL has no equivalent on object stores such as gs://,
  where the lock is skipped with a warning).

  Usage:
    with ModelDirLock(model_dir):
      train(...)
  """

  FILENAME = "LOCK"

  def __init__(self, model_dir: str | os.PathLike,
               is_primary: Optional[bool] = None):
    """Prepares (does not take) the lock.

    Args:
      model_dir: the directory to lock.
      is_primary: whether this process takes the lock; None means
        `jax.process_index() == 0` (call `jax.distributed.initialize` first).
    """
    self.model_dir = str(model_dir)
    self._is_primary = is_primary
    self.path = os.path.join(self.model_dir, self.FILENAME)
    self._held = False

  @staticmethod
  def _holder_id() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._holder_id())
    return True

  def _read_holder(self) -> str:
    try:
      with open(self.path) as f:
        return f.read().strip()
    except FileNotFoundError:
      return ""

  def _is_stale(self, holder: str) -> bool:
    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
      return False
    return not _pid_alive(int(pid))

  def acquire(self) -> "ModelDirLock":
    """Takes the lock.

    Raises:
      RuntimeError: if another live process holds it.
    """
    if "://" in self.model_dir:
      logging.warning("Not locking %s: no atomic create on this filesystem.",
                      self.model_dir)
      return self
    is_primary = self._is_primary
    if is_primary is None:
      is_primary = jax.process_index() == 0
    if not is_primary:
      return self
    os.makedirs(self.model_dir, exist_ok=True)
    for _ in range(3):  # Retries only race with a concurrent release.
      if self._try_create():
        self._held = True
        atexit.register(self.release)
        return self
      holder = self._read_holder()
      if holder and not self._is_stale(holder):
        raise RuntimeError(
            f"MODEL_DIR {self.model_dir} is in use by {holder} (lock file "
            f"{self.path}). Stop that job, or delete the lock file if it is "
            "certainly dead.")
      if holder:
        logging.warning("Taking over stale lock %s of dead process %s.",
                        self.path, holder)
        self._remove_stale(holder)
      else:  # Created but not yet written by its holder.
        time.sleep(0.1)
    raise RuntimeError(f"Could not acquire {self.path}: it keeps changing.")

  def _remove_stale(self, holder: str) -> None:
    """Removes the lock file if it still names `holder`.

    Two jobs may find the same stale lock; the second must not delete the
    fresh lock the first has created meanwhile. Renaming is atomic, so the
    file is moved aside, checked, and put back (never over a newer lock) if
    it turns out to be live.
    """
    aside = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with open(aside) as f:
      moved = f.read().strip()
    if moved != holder:
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    os.remove(aside)

  def release(self) -> None:
    """Removes the lock file if this object holds it (idempotent)."""
    if not self._held:
      return
    self._held = False
    atexit.unregister(self.release)
    if self._read_holder() == self._holder_id():
      os.remove(self.path)

  @property
  def held(self) -> bool:
    return self._held

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
