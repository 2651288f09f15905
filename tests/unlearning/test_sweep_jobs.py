"""Sweep jobs: result files, claims, claim order and the parent's watch."""

import json
import os

from tiered_routing.unlearning import sweep_jobs
from tiered_routing.unlearning import sweep_progress


def _job(tmp_path, name, seed, langs=("ur",), train=10.0, forget=1.0,
         sequence=0.0):
  out = str(tmp_path)
  return sweep_jobs.Job(
      name, seed, os.path.join(out, "runs", name, f"seed{seed}"),
      tuple(sweep_jobs.result_path(out, name, seed, l) for l in langs),
      train, forget, sequence,
  )


def _finish(path, version=sweep_jobs.RESULT_VERSION):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(json.dumps({"version": version}))


def test_result_path_layout(tmp_path):
  assert sweep_jobs.result_path("/o", "family4_none", 2, "ur") == (
      "/o/runs/family4_none/seed2/ur/result.json"
  )


def test_claim_is_exclusive_until_cleared(tmp_path):
  job = _job(tmp_path, "a", 0)
  assert sweep_jobs.claim(job)
  assert not sweep_jobs.claim(job)  # A second worker is refused.
  assert sweep_jobs.clear_claims([job, _job(tmp_path, "b", 0)]) == 1
  assert sweep_jobs.claim(job)


def test_claim_order_is_configuration_by_configuration_in_priority(tmp_path):
  jobs = [
      _job(tmp_path, name, seed)
      for name in ("a", "b", "c", "unlisted") for seed in (0, 1, 2)
  ]
  order = [(j.name, j.seed) for j in sweep_jobs.claim_order(jobs, "cab")]
  assert order == [
      ("c", 0), ("c", 1), ("c", 2), ("a", 0), ("a", 1), ("a", 2),
      ("b", 0), ("b", 1), ("b", 2),
      ("unlisted", 0), ("unlisted", 1), ("unlisted", 2),
  ]


class _FakeWorker:
  """Finishes one result file per poll, then exits with `code`."""

  def __init__(self, paths, code=0):
    self.paths, self.code = list(paths), code

  def poll(self):
    if self.paths:
      _finish(self.paths.pop(0))
      return None
    return self.code


def test_watch_credits_each_result_once_and_returns_exit_codes(
    tmp_path, monkeypatch
):
  a = _job(tmp_path, "a", 0, langs=("ur", "de"))
  b = _job(tmp_path, "b", 0)
  done_before = _job(tmp_path, "c", 0)
  _finish(done_before.result_paths[0])
  workers = [_FakeWorker(a.result_paths), _FakeWorker(b.result_paths, 3)]
  lines = []
  monkeypatch.setattr(
      sweep_progress.logging, "info", lambda fmt, *a: lines.append(fmt % a)
  )
  reports = []
  codes = sweep_jobs.watch(
      [a, b, done_before], workers,
      on_result=lambda: reports.append(
          sum(os.path.exists(p) for j in (a, b) for p in j.result_paths)
      ),
      sleep=lambda s: None,
  )
  assert codes == [0, 3]
  assert reports == [2, 3]  # After each poll with new results, not before.
  assert len(lines) == 3  # One per new result; the restored one is not.
  assert lines[-1].startswith("sweep 4/4 units")
  assert lines[-1].endswith("ETA 0:00:00")


def test_remaining_weight_counts_training_until_the_first_result(tmp_path):
  """The serial runner and the parent's watch share this estimate; they
  used to disagree on a partly finished job (train counted if any result
  was missing vs only if all were)."""
  job = _job(tmp_path, "family2_none", 0, langs=("ur", "de", "zh"))
  assert job.remaining_weight() == 10.0 + 3 * 1.0
  _finish(job.result_paths[0])
  assert job.remaining_weight() == 2 * 1.0  # The original is trained.
  for path in job.result_paths[1:]:
    _finish(path)
  assert job.remaining_weight() == 0.0


def test_results_of_an_older_version_are_redone(tmp_path):
  """Units saved before the audits existed (no 'version') are forgotten
  again on resume; an unreadable result is redone too."""
  job = _job(tmp_path, "family2_none", 0, langs=("ur", "de", "zh"))
  _finish(job.result_paths[0])
  _finish(job.result_paths[1], version=1)
  os.makedirs(os.path.dirname(job.result_paths[2]), exist_ok=True)
  with open(job.result_paths[2], "w") as f:
    f.write('{"rows": [')  # Torn.
  assert job.missing() == list(job.result_paths[1:])
  old = json.loads(open(job.result_paths[1]).read())
  del old["version"]
  with open(job.result_paths[1], "w") as f:
    f.write(json.dumps(old))
  assert not sweep_jobs.is_current(job.result_paths[1])


def test_the_sequence_weighs_its_own_estimate(tmp_path):
  job = _job(tmp_path, "family4_none", 0, ("ur", sweep_jobs.SEQUENTIAL),
             train=10.0, forget=1.0, sequence=4.0)
  assert job.remaining_weight() == 10.0 + 1.0 + 4.0
  _finish(job.result_paths[0])
  assert job.remaining_weight() == 4.0
  assert job.weight_of(job.result_paths[1]) == 4.0
