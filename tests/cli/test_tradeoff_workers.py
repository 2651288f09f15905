"""The trade-off sweep's worker processes (--workers=2), killed and resumed.

Its own file, apart from the end-to-end smoke sweep of test_tradeoff.py, so
that the two multi-minute sweeps run on different pytest-xdist workers.
"""

import os
import sys
import time

import pytest


def _claimed_pids(output_dir):
  pids = []
  for seed in (0, 1):
    path = output_dir / "runs" / "family2_attention" / f"seed{seed}" / "CLAIM"
    if path.exists() and path.read_text().strip():
      pids.append(int(path.read_text()))
  return pids


def _wait(predicate, timeout_s):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.2)
  return False


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (not yet reaped by init) counts as dead.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(")")[-1].split()[0] != "Z"


# Workers, kills and resumes are what this test is about; the audits and
# the sequential removals run in test_tradeoff.py's end-to-end test, so they
# are off here, on the hybrid alone (a third of the test's time).
NO_AUDITS = ("--gin.tradeoff_script.AuditConfig.enabled=False",
             "--gin.CONFIGURATIONS=['family2_attention']",
             "--gin.SEQUENTIAL_CONFIGURATIONS=[]")


@pytest.mark.heavy
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG")
def test_two_workers_die_with_a_killed_sweep_and_resume_identically(
    tmp_path, run_smoke_sweep, start_smoke_sweep,
):
  killed = tmp_path / "killed"
  # One compilation cache for every run: the clean sweep loads what the
  # killed one compiled (the same executables), as a resume does.
  args = ("--workers=2", f"--jax_cache_dir={tmp_path / 'jax_cache'}",
          *NO_AUDITS)
  parent = start_smoke_sweep(killed, *args)
  assert _wait(lambda: len(_claimed_pids(killed)) == 2, 240), (
      parent.stderr.read() if parent.poll() is not None else "no claims"
  )
  workers = _claimed_pids(killed)
  parent.kill()  # SIGKILL: no clean-up code runs in the parent.
  parent.wait()
  assert _wait(lambda: not any(_alive(p) for p in workers), 60), workers

  resumed = run_smoke_sweep(killed, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "2 workers started" in resumed.stderr
  assert (killed / "logs" / "worker1.log").exists()
  assert not list(killed.glob("runs/*/*/CLAIM"))

  clean = run_smoke_sweep(tmp_path / "clean", *args)
  assert clean.returncode == 0, clean.stderr[-3000:]
  expected = (tmp_path / "clean" / "results.csv").read_text()
  assert (killed / "results.csv").read_text() == expected

  # One thread per process sums in another order than two threads: the
  # recorded XLA flags refuse a resume with --workers=1.
  serial = run_smoke_sweep(killed, *args[1:])
  assert serial.returncode != 0
  assert "different xla_flags" in serial.stderr
