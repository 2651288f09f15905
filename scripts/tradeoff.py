r"""The unlearnability-vs-utility trade-off sweep (the project's main job).

For every configuration (n partitions x scheme x sharing level): train, score
every language, train the reference model that never saw the forget
language, forget it with every method (exact retrain or drop, expert
masking, GA, GradDiff, NPO, TRACE) and score again; see
`tiered_routing.unlearning.runner`. Writes into --output_dir:

  results.csv       one row per (configuration, method), every column
  results.md        the trade-off table (Markdown)
  pareto.png        utility loss vs forget quality, Pareto front drawn
  per_language.csv  validation loss / bpb of every model and language
  runs/<config>/    checkpoints (original, reference) and result.json

Presets (gin/experiments/tradeoff_<preset>.gin):
  smoke   two tiny configurations, a handful of steps (the tests).
  sample  n in {1, 4, 16}, family and one random scheme, the sharing levels
          that differ per n, tiny model on the embedded corpus; under 15
          minutes on 2 CPU cores.
  mc4     the full sweep on mC4 with the size configs (TPU).

  python scripts/tradeoff.py --preset=sample --output_dir=/tmp/tradeoff_sample
  python scripts/tradeoff.py --preset=sample --output_dir=/tmp/t \
      --gin.FORGET_LANGUAGE="'si'" --gin.UNLEARN_STEPS=40

Rerunning with the same --output_dir resumes: finished configurations are
kept, unfinished ones resume from their checkpoints. A rerun whose
configuration (gin files, bindings, XLA flags, jax version) differs from the
one recorded in output_dir/sweep.json is refused, so results never mix.
Results files are replaced atomically after every configuration.

On CPU, unless XLA_FLAGS is set, XLA's backend optimisation is turned down
(--cpu_fast_compile): compiling dominates these short runs, and the flags
change no comparison (every model of a sweep is compiled the same way). The
JAX compilation cache (--jax_cache_dir, default output_dir/jax_cache) lets
identical programs (the reference model's training step, a resumed run) load
instead of recompiling.
"""

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import gin

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import seqio

from tasks import mixtures
from tiered_routing.data import seqio_names
from tiered_routing.train import atomic_file
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.tier1 import languages
from tiered_routing.train import model_dir_lock
from tiered_routing.train import optimizers
from tiered_routing import sharding
from tiered_routing.tier1 import schemes
from tiered_routing.train import trainer
from tiered_routing.model import transformer
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import specs
from tiered_routing.data import stream_cache
from tiered_routing.unlearning import trace
from tiered_routing.unlearning import trained_models

PRESETS = ("smoke", "sample", "mc4")
FAST_CPU_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)

flags.DEFINE_enum(
    "preset",
    None,
    PRESETS,
    "gin/experiments/tradeoff_<preset>.gin, read before any " "--gin_file.",
)
flags.DEFINE_string("output_dir", None, "Where results and checkpoints go.")
flags.DEFINE_bool(
    "cpu_fast_compile",
    True,
    f"On CPU and without XLA_FLAGS set, use {FAST_CPU_XLA_FLAGS}.",
)
flags.DEFINE_string(
    "jax_cache_dir",
    None,
    "JAX compilation cache; default output_dir/jax_cache; " "'' disables it.",
)
FLAGS = flags.FLAGS

for _cls in (
    specs.UnlearningConfig,
    gradient_methods.FinetuneConfig,
    trace.TraceConfig,
    expert_attribution.AttributionConfig,
):
  gin.external_configurable(_cls, module="tradeoff_script")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Everything a sweep runs (bound by gin through `sweep`)."""

  model_config: transformer.DecoderConfig
  train_config: trainer.TrainConfig
  batch_size: int
  sequence_length: int
  source: str = "sample"
  num_partitions: tuple[int, ...] = (1, 2, 4, 8, 16)
  scheme_kinds: tuple[str, ...] = ("family", "random")
  sharing_levels: tuple[str, ...] = ("none", "attention", "all")
  scheme_seed: int = 0
  only: Optional[tuple[str, ...]] = None
  model_overrides: Optional[dict[int, dict[str, Any]]] = None
  optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig()
  unlearning: specs.UnlearningConfig = specs.UnlearningConfig()
  mesh_config: sharding.MeshConfig = sharding.MeshConfig()
  data_seed: int = 0
  materialize_data: bool = True
  max_validation_examples: Optional[int] = None


@gin.configurable("sweep", module="tradeoff_script")
def make_sweep(**kwargs) -> Sweep:
  for name in ("num_partitions", "scheme_kinds", "sharing_levels", "only"):
    if kwargs.get(name) is not None:
      kwargs[name] = tuple(kwargs[name])
  return Sweep(**kwargs)


@dataclasses.dataclass(frozen=True)
class Configuration:
  name: str
  scheme: schemes.PartitionScheme
  model_config: transformer.DecoderConfig


def configurations(sweep: Sweep) -> list[Configuration]:
  """The sweep's configurations, without duplicates.

  With one partition every scheme and sharing level is the same model, so
  n = 1 runs once ('family1_none'); with 16 singleton partitions a random
  scheme only renumbers the family one, so n = 16 runs the family scheme.
  """
  out = []
  for n in sweep.num_partitions:
    for kind in sweep.scheme_kinds:
      if (n == 1 and kind != "family") or (n == 16 and kind == "random"):
        continue
      scheme = schemes.make_scheme(kind, n, sweep.scheme_seed)
      for sharing in sweep.sharing_levels:
        if n == 1 and sharing != "none":
          continue
        overrides = (sweep.model_overrides or {}).get(n, {})
        config = dataclasses.replace(
            sweep.model_config, num_partitions=n, sharing=sharing, **overrides
        )
        out.append(Configuration(f"{scheme.name}_{sharing}", scheme, config))
  if sweep.only is not None:
    names = [c.name for c in out]
    unknown = [n for n in sweep.only if n not in names]
    if unknown:
      raise ValueError(
          f"tradeoff.sweep.only names {unknown}, which the "
          f"sweep does not produce; it produces {names}."
      )
    out = [c for c in out if c.name in sweep.only]
  return out


def _register_mixture(
    source: str, table_name: str, partition: int, codes: tuple[str, ...]
) -> str:
  """The retained languages of a partition, mixed like its original mixture."""
  name = seqio_names.partition_name(source, table_name, partition)
  if name not in seqio.MixtureRegistry.names():
    rate = functools.partial(
        seqio.mixing_rate_num_examples, temperature=mixtures.DEFAULT_TEMPERATURE
    )
    seqio.MixtureRegistry.add(
        name, [(seqio_names.task_name(source, c), rate) for c in codes]
    )
  return name


def data_spec(
    source: str, scheme: schemes.PartitionScheme
) -> specs.DataSpec:
  return specs.DataSpec(
      partition_names=tuple(mixtures.partition_mixture_names(source, scheme)),
      task_name=functools.partial(seqio_names.task_name, source),
      mixture_name=functools.partial(_register_mixture, source),
  )


def _manifest(sweep_names: list[str]) -> dict[str, Any]:
  return {
      "gin_config": gin.config_str(),
      "configurations": sweep_names,
      "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_version": jax.__version__,
  }


def _result_path(output_dir: str, name: str) -> str:
  return os.path.join(output_dir, "runs", name, "result.json")


def _save_result(
    output_dir: str,
    name: str,
    result: runner.ConfigurationResult,
    wall_s: float,
) -> None:
  payload = {
      "rows": [r.to_row() for r in result.results],
      "languages": result.languages,
      "wall_s": wall_s,
  }
  atomic_file.write_text(
      _result_path(output_dir, name), json.dumps(payload, indent=1) + "\n"
  )


def run_sweep(sweep: Sweep, output_dir: str) -> list[dict]:
  """Runs (or resumes) every configuration; returns their payloads."""
  configs = configurations(sweep)
  code = sweep.unlearning.forget_language
  title = (
      f"Forgetting {languages.get(code).name} ({code}): " f"{sweep.source} data"
  )
  mesh = sharding.make_mesh(sweep.mesh_config)
  cache = stream_cache.DataCache(
      sweep.sequence_length,
      sweep.data_seed,
      materialize=sweep.materialize_data,
      max_validation_examples=sweep.max_validation_examples,
  )
  payloads = []
  for c in configs:
    path = _result_path(output_dir, c.name)
    if os.path.exists(path):
      logging.info("%s: done earlier, kept.", c.name)
    else:
      start = time.time()
      spec = trained_models.TrainSpec(
          c.model_config,
          sweep.optimizer_config,
          sweep.train_config,
          sweep.batch_size,
          sweep.sequence_length,
      )
      result = runner.run_configuration(
          run=c.name,
          scheme=c.scheme,
          spec=spec,
          data=data_spec(sweep.source, c.scheme),
          config=sweep.unlearning,
          cache=cache,
          work_dir=os.path.dirname(path),
          mesh=mesh,
      )
      _save_result(output_dir, c.name, result, time.time() - start)
      logging.info("%s: done in %.0f s.", c.name, time.time() - start)
    with open(path, encoding="utf-8") as f:
      payloads.append(json.load(f))
    sweep_report.write_outputs(output_dir, payloads, title)
  return payloads


def _setup_jax(output_dir: str) -> None:
  """XLA flags, RNG and compilation cache; before the backend starts.

  On CPU (--cpu_fast_compile) XLA's expensive passes are off unless XLA_FLAGS
  is set, and random bits come from the non-partitionable threefry, which
  XLA:CPU compiles several times faster (initialising a model compiled for
  ~25 s otherwise); both hold for every model of the sweep and are recorded
  in sweep.json.
  """
  if FLAGS.cpu_fast_compile and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ.setdefault("XLA_FLAGS", FAST_CPU_XLA_FLAGS)
    jax.config.update("jax_threefry_partitionable", False)
  cache_dir = FLAGS.jax_cache_dir
  if cache_dir is None:
    cache_dir = os.path.join(output_dir, "jax_cache")
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _quiet_library_logs() -> None:
  """Orbax and SeqIO log every checkpoint and dataset at INFO; keep their
  warnings only, so the sweep's own progress stays readable."""

  def keep(record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "seqio"))
    return not noisy or record.levelno >= std_logging.WARNING

  logging.get_absl_handler().addFilter(keep)


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
  with model_dir_lock.ModelDirLock(output_dir):
    _setup_jax(output_dir)
    gin_flags.parse_gin(files, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    sweep = make_sweep()
    if sweep_report.check_or_write_manifest(
        output_dir, _manifest([c.name for c in configurations(sweep)])
    ):
      logging.info("Resuming the sweep in %s.", output_dir)
    start = time.time()
    run_sweep(sweep, output_dir)
    logging.info(
        "Sweep finished in %.0f s; results in %s.",
        time.time() - start,
        output_dir,
    )


if __name__ == "__main__":
  app.run(main, flags_parser=gin_flags.parse_flags)
