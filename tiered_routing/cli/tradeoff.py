r"""The unlearnability-vs-utility trade-off sweep (the project's main job).

For every configuration (n partitions x scheme x sharing level) and training
seed: train, score every language, and for every forget language train the
reference model that never saw it, forget it with every method (exact
retrain or drop, expert masking, GA, GradDiff, NPO, NPO+retain, TRACE) and
score again; see `tiered_routing.unlearning.sweep` and `runner`. Writes
into --output_dir (`unlearning.sweep_report`):

  results.csv / .md     one row per (configuration, forget language,
                        method): mean and 95% interval over seeds
  results_by_seed.csv   the same, one row per seed
  originals.csv / .md   the original models against n-gram baselines
  comparisons.csv / .md paired differences over seeds (resolved or not)
  per_language.csv      every model's loss per language, with baselines
  pareto.png            utility loss vs forget quality, with intervals
  relearning.csv / .png relearning attacks' curves (and the other audit
                        columns in results*.csv: docs/unlearning_audits.md)
  sequential.csv / .png removal requests in sequence: utility and cost
                        after each (presets with sequential_configurations)
  baselines.json        unigram / bigram loss per language
  runs/<config>/seed<s>/  checkpoints and one result.json per language
                        (and sequential/result.json)

Presets (gin/experiments/tradeoff_<preset>.gin):
  smoke   one tiny configuration, two seeds, a handful of steps (tests).
  sample  n in {1, 4, 16}, family and one random scheme, the sharing levels
          that differ per n, tiny model on UDHR-16, one seed: a demo of a
          few minutes whose numbers are not evidence.
  cpu     the research plan's grid on debian16 at equal total parameters,
          three seeds, three forget languages (README "The main job").
  mc4     the full sweep on mC4 with the size configs (TPU).

  python -m tiered_routing.cli.tradeoff --preset=sample \
      --output_dir=/tmp/tradeoff_sample
  python scripts/tradeoff.py --preset=sample --output_dir=/tmp/t \
      --gin.FORGET_LANGUAGE="'si'" --gin.UNLEARN_STEPS=40

(`scripts/tradeoff.py` runs this binary, as the README's set-up command
does.)

--workers=N runs the (configuration, seed) jobs in N processes of one
XLA thread each (logs in output_dir/logs/); this process computes the
baselines, prints the progress line and writes the report. The cpu preset
is meant for `--workers=2` on 2 cores (README "The main job").

Rerunning with the same --output_dir resumes: finished units
(configuration, seed, forget language) are kept, unfinished ones resume
from their checkpoints. A rerun whose configuration (gin files, bindings,
XLA flags, jax version) differs from the one recorded in
output_dir/sweep.json is refused, so results never mix; only how often
models checkpoint and log may change (`TrainConfig.save_every_steps` and
the like compute nothing). Results files are replaced atomically after
every unit.

On CPU, unless XLA_FLAGS is set, the short presets (smoke, sample) turn
XLA's backend optimisation down (--cpu_fast_compile): compiling dominates
those runs, and the flags change no comparison (every model of a sweep is
compiled the same way). Longer sweeps (cpu) keep it: their steps run about
twice as fast optimised. The JAX compilation cache (--jax_cache_dir,
default output_dir/jax_cache) lets identical programs (the reference
model's training step, a resumed run, the second worker's copy of the
first's) load instead of recompiling. It keeps every program, however
fast it compiled: with the fast-compile flags most take a fraction of a
second, and a smoke sweep compiles ~220 of them. Keeping those over half a
second, then all, took the smoke sweep's end-to-end test from 282 s to
233 s, and its killed-and-resumed two-worker test from 182 s to 148 s
(164 s keeping those over 0.1 s).
"""

import ctypes
import functools
import logging as std_logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import resume_check
from tiered_routing.cli import user_errors
from tiered_routing.model import param_count
from tiered_routing.train import model_dir_lock
from tiered_routing.unlearning import sweep as sweep_lib
from tiered_routing.unlearning import sweep_costs
from tiered_routing.unlearning import sweep_jobs
from tiered_routing.unlearning import sweep_report

PRESETS = ("smoke", "sample", "cpu", "mc4")
FAST_COMPILE_PRESETS = ("smoke", "sample")
FAST_CPU_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)

flags.DEFINE_enum(
    "preset",
    None,
    PRESETS,
    "gin/experiments/tradeoff_<preset>.gin, read before any --gin_file.",
)
flags.DEFINE_bool(
    "cpu_fast_compile",
    None,
    f"On CPU and without XLA_FLAGS set, use {FAST_CPU_XLA_FLAGS}. Default:"
    f" on for the short presets {FAST_COMPILE_PRESETS}, where compiling "
    "dominates; off otherwise (the compiled steps run about half as fast).",
)
flags.DEFINE_string(
    "jax_cache_dir",
    None,
    "JAX compilation cache; default output_dir/jax_cache; '' disables it.",
)
flags.DEFINE_integer(
    "workers",
    1,
    "Run the sweep's (configuration, seed) jobs in this many processes, "
    "each with one XLA thread (on 2 cores, two 1-thread train steps run "
    "~30% more tokens/s than one 2-thread step; docs/performance.md). The "
    "thread count changes float "
    "summation order, so results match reruns with --workers > 1, not "
    "--workers=1 (sweep.json records the flags; a resume must agree).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "worker_index",
    None,
    "Internal: set by a --workers parent on the processes it starts.",
)
FLAGS = flags.FLAGS
# One XLA:CPU thread per process (--workers > 1).
ONE_THREAD_XLA_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


@gin.configurable("sweep", module="tradeoff_script")
def make_sweep(**kwargs) -> sweep_lib.Sweep:
  for name in (
      "num_partitions",
      "scheme_kinds",
      "sharing_levels",
      "only",
      "scheme_seeds",
      "seeds",
      "forget_languages",
      "shared_forget_languages",
      "sequential_configurations",
      "sequential_languages",
      "audit_configurations",
      "audit_forget_languages",
  ):
    if kwargs.get(name) is not None:
      kwargs[name] = tuple(kwargs[name])
  return sweep_lib.Sweep(**kwargs)


def _manifest(sweep_names: list[str]) -> dict[str, Any]:
  return {
      "gin_config": gin.config_str(),
      "configurations": sweep_names,
      "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_version": jax.__version__,
  }


def _same_results(key: str, recorded: Any, current: Any) -> bool:
  """Manifest values that differ as written but not in what they compute:
  gin configs that differ only in checkpoint and log cadence (a rerun may
  checkpoint more often so that a kill loses less)."""
  return key == "gin_config" and resume_check.only_cadence_differs(
      recorded, current)


def _setup_jax(output_dir: str) -> None:
  """XLA flags, RNG and compilation cache; before the backend starts.

  On CPU (--cpu_fast_compile) XLA's expensive passes are off unless XLA_FLAGS
  is set, and random bits come from the non-partitionable threefry, which
  XLA:CPU compiles several times faster (initialising a model compiled for
  ~25 s otherwise); both hold for every model of the sweep and are recorded
  in sweep.json.
  """
  fast = FLAGS.cpu_fast_compile
  if fast is None:
    fast = FLAGS.preset in FAST_COMPILE_PRESETS
  if fast and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ.setdefault("XLA_FLAGS", FAST_CPU_XLA_FLAGS)
    jax.config.update("jax_threefry_partitionable", False)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if FLAGS.workers > 1 and ONE_THREAD_XLA_FLAGS not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {ONE_THREAD_XLA_FLAGS}".strip()
  cache_dir = FLAGS.jax_cache_dir
  if cache_dir is None:
    cache_dir = os.path.join(output_dir, "jax_cache")
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _quiet_library_logs() -> None:
  """Orbax and SeqIO log every checkpoint and dataset at INFO; keep their
  warnings only, so the sweep's own progress stays readable."""

  def keep(record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "seqio"))
    return not noisy or record.levelno >= std_logging.WARNING

  logging.get_absl_handler().addFilter(keep)


def _log_sizes(configs) -> None:
  """One line per configuration: its widths and parameter counts (the cpu
  preset holds the total equal across n, `model.size_family`)."""
  base = None
  for c in configs:
    m = c.model_config
    count = param_count.count_params(m)
    base = base or count.total
    logging.info(
        "%-20s d_model %4d, %3d experts x %4d per partition: %.2fM "
        "parameters (%+.1f%% of the first), %.2fM active per token",
        c.name, m.d_model, m.num_experts, m.expert_d_ff, count.total / 1e6,
        100 * (count.total / base - 1), count.active / 1e6,
    )


def _die_with_parent() -> None:
  """In a worker, before exec: SIGTERM when the parent dies (Linux), so a
  killed sweep leaves no worker behind to race its resume."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _launch_workers(output_dir: str, count: int) -> list[subprocess.Popen]:
  """Starts `count` copies of this binary as workers; logs in logs/."""
  log_dir = os.path.join(output_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  processes = []
  for index in range(count):
    path = os.path.join(log_dir, f"worker{index}.log")
    with open(path, "a", encoding="utf-8") as log:
      processes.append(
          subprocess.Popen(
              [sys.executable, "-m", "tiered_routing.cli.tradeoff",
               *sys.argv[1:], f"--worker_index={index}"],
              stdout=log, stderr=subprocess.STDOUT,
              preexec_fn=_die_with_parent,
          )
      )
  logging.info("%d workers started; their logs: %s", count, log_dir)
  return processes


def _pin_to_one_core(index: int) -> None:
  """Worker i runs on core i mod (cores). Even with one XLA thread per
  op, XLA:CPU keeps a thread pool sized to the visible cores, and unpinned
  those threads of two workers compete for both cores (load 4.6 on 2
  cores, 2,500 instead of 3,460 tok/s). Pinning changes no result (the
  same bits, checked on the cpu preset's n = 4 member)."""
  if hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
      os.sched_setaffinity(0, {cores[index % len(cores)]})


def _run_worker(files: list[str], output_dir: str) -> None:
  """A worker: the parent holds the lock and wrote sweep.json."""
  _pin_to_one_core(FLAGS.worker_index)
  _setup_jax(output_dir)
  gin_flags.parse_gin(files, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  sweep_lib.run_worker(make_sweep(), output_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required.")
  files = (
      [f"gin/experiments/tradeoff_{FLAGS.preset}.gin"] if FLAGS.preset else []
  ) + list(FLAGS.gin_file)
  if not files:
    raise app.UsageError("Give --preset or --gin_file.")
  _quiet_library_logs()
  output_dir = os.path.abspath(FLAGS.output_dir)
  os.makedirs(output_dir, exist_ok=True)
  if FLAGS.worker_index is not None:
    _run_worker(files, output_dir)
    return
  launch = None
  if FLAGS.workers > 1:
    launch = functools.partial(_launch_workers, output_dir, FLAGS.workers)
  with model_dir_lock.ModelDirLock(output_dir, label="--output_dir"):
    _setup_jax(output_dir)
    gin_flags.parse_gin(files, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    sweep = make_sweep()
    configs = sweep_lib.configurations(sweep)
    names = [c.name for c in configs]
    _log_sizes(configs)
    if sweep_report.check_or_write_manifest(
        output_dir, _manifest(names), same=_same_results):
      logging.info("Resuming the sweep in %s.", output_dir)
    start = time.time()
    try:
      payloads = sweep_lib.run_sweep(sweep, output_dir, launch)
    except sweep_jobs.WorkersFailed as e:
      logging.error("%s", e)
      sys.exit(1)
    logging.info(
        "Sweep finished in %.0f s; results in %s. Cost: %s.",
        time.time() - start,
        output_dir,
        sweep_costs.total_line(sweep_costs.cost_rows(payloads)),
    )


if __name__ == "__main__":
  user_errors.run(main)
