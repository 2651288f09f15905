"""Tests for tiered_routing.model_dir_lock."""

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tiered_routing.train import model_dir_lock

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def test_lock_refuses_second_holder_and_is_released(tmp_path):
  model_dir = tmp_path / "model"
  with model_dir_lock.ModelDirLock(model_dir) as lock:
    assert lock.held
    holder = f"{os.getpid()}@{socket.gethostname()}"
    assert (model_dir / "LOCK").read_text() == holder
    with pytest.raises(RuntimeError, match=f"{model_dir} is in use by "
                       f"{holder}"):
      model_dir_lock.ModelDirLock(model_dir).acquire()
  assert not lock.held
  assert not (model_dir / "LOCK").exists()
  with pytest.raises(KeyError):
    with model_dir_lock.ModelDirLock(model_dir):
      raise KeyError("boom")
  assert not (model_dir / "LOCK").exists()  # Released on an exception too.
  # Non-primary hosts of a multi-host job do not lock.
  with model_dir_lock.ModelDirLock(model_dir, is_primary=False) as other:
    assert not other.held and not (model_dir / "LOCK").exists()


def test_lock_of_other_process(tmp_path, caplog):
  """A live process's lock refuses; once it is killed the lock is stale."""
  child = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from tiered_routing.train import model_dir_lock
          model_dir_lock.ModelDirLock({str(tmp_path)!r}).acquire()
          print("locked", flush=True)
          time.sleep(120)
          """)],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=f"in use by {child.pid}@"):
      model_dir_lock.ModelDirLock(tmp_path).acquire()
  finally:
    child.send_signal(signal.SIGKILL)  # No chance to release.
    child.wait()
  assert (tmp_path / "LOCK").read_text().startswith(f"{child.pid}@")
  with caplog.at_level(logging.WARNING):
    with model_dir_lock.ModelDirLock(tmp_path):
      assert (tmp_path / "LOCK").read_text().startswith(f"{os.getpid()}@")
  assert "stale lock" in caplog.text
  assert not (tmp_path / "LOCK").exists()


def test_lock_from_another_host_is_not_taken_over(tmp_path):
  (tmp_path / "LOCK").write_text("1@some-other-host")
  with pytest.raises(RuntimeError, match="in use by 1@some-other-host"):
    model_dir_lock.ModelDirLock(tmp_path).acquire()
  assert (tmp_path / "LOCK").read_text() == "1@some-other-host"


def test_stale_removal_keeps_a_lock_taken_meanwhile(tmp_path):
  # Job A saw a stale lock "999999@host"; before it removes it, job B took
  # over and wrote its own lock. A must not delete B's lock.
  (tmp_path / "LOCK").write_text("4242@" + socket.gethostname())
  lock = model_dir_lock.ModelDirLock(tmp_path)
  lock._remove_stale("999999@" + socket.gethostname())
  assert (tmp_path / "LOCK").read_text() == "4242@" + socket.gethostname()
  lock._remove_stale("4242@" + socket.gethostname())
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe\x00garbage"])
def test_empty_or_garbled_lock_is_stale(tmp_path, caplog, content):
  """A 0-byte LOCK (an older version's lock cut short by a full disk, or
  `: > LOCK`) made every later run fail; no live holder writes one."""
  (tmp_path / "LOCK").write_bytes(content)
  with caplog.at_level(logging.WARNING):
    with model_dir_lock.ModelDirLock(tmp_path) as lock:
      assert lock.held
      assert (tmp_path / "LOCK").read_text() == (
          f"{os.getpid()}@{socket.gethostname()}")
  assert "stale lock" in caplog.text
  assert os.listdir(tmp_path) == []  # No private or moved-aside files left.


def test_lock_message_names_the_directory_as_the_user_gave_it(tmp_path):
  (tmp_path / "LOCK").write_text("1@some-other-host")
  with pytest.raises(RuntimeError, match=f"^--output_dir {tmp_path} is in"):
    model_dir_lock.ModelDirLock(tmp_path, label="--output_dir").acquire()
