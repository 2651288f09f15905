"""A lock file that refuses a second job writing the same model directory."""

import atexit
import os
import re
import socket
from typing import Optional

from absl import logging
import jax


class ModelDirInUseError(RuntimeError):
  """Another live job holds the directory's lock."""


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
  resume logic. The lock is a file holding `pid@hostname`, created with its
  content in one step (written to a private file, then hard-linked into
  place, which fails if the lock exists), so no reader ever sees it empty.
  A lock left by a dead process on this host is taken over with a warning,
  and so is one that does not hold `pid@hostname` (empty or garbled, e.g.
  cut short by a full disk under an older version): no live holder writes
  that. A lock from another host cannot be checked and must be removed by
  hand. Only process 0 of a multi-host job takes it, and only on
  local filesystems (O_EXCL has no equivalent on object stores such as gs://,
  where the lock is skipped with a warning).

  Usage:
    with ModelDirLock(model_dir):
      train(...)
  """

  FILENAME = "LOCK"

  def __init__(self, model_dir: str | os.PathLike,
               is_primary: Optional[bool] = None, label: str = "MODEL_DIR"):
    """Prepares (does not take) the lock.

    Args:
      model_dir: the directory to lock.
      is_primary: whether this process takes the lock; None means
        `jax.process_index() == 0` (call `jax.distributed.initialize` first).
      label: how the user named the directory, for messages ('MODEL_DIR',
        '--output_dir').
    """
    self.model_dir = str(model_dir)
    self.label = label
    self._is_primary = is_primary
    self.path = os.path.join(self.model_dir, self.FILENAME)
    self._held = False

  @staticmethod
  def _holder_id() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"

  def _try_create(self) -> bool:
    """Creates the lock with its content at once; False if it exists."""
    private = f"{self.path}.{os.getpid()}.new"
    with open(private, "w") as f:
      f.write(self._holder_id())
    try:
      os.link(private, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(private)

  def _read_holder(self) -> Optional[str]:
    """The lock's content; None if there is no lock file."""
    try:
      with open(self.path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
      return None

  def _is_stale(self, holder: str) -> bool:
    if not re.fullmatch(r"\d+@\S+", holder):
      return True  # Empty or garbled: no live holder writes that.
    pid, _, host = holder.partition("@")
    if host != socket.gethostname():
      return False
    return not _pid_alive(int(pid))

  def acquire(self) -> "ModelDirLock":
    """Takes the lock.

    Raises:
      ModelDirInUseError: if another live process holds it.
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
      if holder is None:  # Released meanwhile.
        continue
      if not self._is_stale(holder):
        raise ModelDirInUseError(
            f"{self.label} {self.model_dir} is in use by {holder} (lock file "
            f"{self.path}). Stop that job, or delete the lock file if it is "
            "certainly dead.")
      logging.warning("Taking over the stale lock %s (%s).", self.path,
                      f"dead process {holder}" if holder else "empty")
      self._remove_stale(holder)
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
    with open(aside, "rb") as f:
      moved = f.read().decode("utf-8", errors="replace").strip()
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
