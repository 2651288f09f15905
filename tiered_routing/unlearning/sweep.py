"""The trade-off sweep: every configuration trained, forgotten and reported.

A `Sweep` (bound by gin in `cli.tradeoff`) lists what to run: the numbers
of partitions, scheme kinds (with the random schemes' seeds) and sharing
levels (`configurations` drops the combinations that are the same model),
the model (with `equal_total_params`, the n = 1 model of a family whose
every member has its total parameters, `model.size_family`), optimizer and
training settings, the training seeds, the forget languages and the
unlearning settings.

`run_sweep` trains every (configuration, seed) once and forgets each forget
language from it (`runner.forget`): configurations with shared parameters
(n = 1, sharing 'attention' or 'all') need a full retrain per forget
language for their reference, so they may forget fewer languages
(`shared_forget_languages`). Each (configuration, seed, language) is saved
as `runs/<config>/seed<s>/<lang>/result.json`, and the report files
(`sweep_report.write_outputs`) are rewritten atomically after each, so a
killed sweep loses at most the unit it was running and resumes from its
checkpoints. One progress line per unit gives the whole sweep's ETA.
With `launch`, worker processes run the (configuration, seed) jobs in
parallel (`run_worker`, `sweep_jobs`).
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional

from absl import logging

from tiered_routing import sharding
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.model import decoder_config
from tiered_routing.model import param_count
from tiered_routing.model import size_family
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep_baselines
from tiered_routing.unlearning import sweep_progress
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_jobs

# Seeds of different training runs draw from well separated data streams.
_DATA_SEED_STRIDE = 1000


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Everything a sweep runs.

  Attributes:
    model_config: the model of every configuration (num_partitions and
      sharing are set per configuration; `model_overrides` per n), or with
      `equal_total_params` the n = 1 member of the family.
    train_config: training of the original and reference models (its seed
      is replaced by each of `seeds`).
    batch_size: global batch B (B/P rows per partition).
    sequence_length: L.
    source: the data source ('sample', 'debian16', 'mc4', 'mc4_json').
    num_partitions: the values of n.
    scheme_kinds: 'family' and / or 'random'.
    sharing_levels: 'none', 'attention', 'all'.
    scheme_seeds: the random schemes' seeds (one configuration each).
    only: run only these configuration names (None = all).
    model_overrides: {n: {DecoderConfig field: value}}, e.g. the size
      configs' widths per n.
    equal_total_params: build every configuration with
      `size_family.member` from `model_config` (then model_overrides must
      be None).
    seeds: training seeds: model init, data order and unlearning batches.
    forget_languages: languages forgotten from every configuration; None =
      (unlearning.forget_language,).
    shared_forget_languages: those forgotten from configurations with
      shared parameters; None = forget_languages.
    optimizer_config: the optimizer.
    unlearning: how to forget (its forget_language and seed are set per
      unit).
    mesh_config: mesh axis sizes.
    data_seed: offset of every seed's data streams.
    materialize_data: keep training streams in memory (small corpora).
    max_validation_examples: per language (None = the whole split).
  """

  model_config: decoder_config.DecoderConfig
  train_config: steps.TrainConfig
  batch_size: int
  sequence_length: int
  source: str = "sample"
  num_partitions: tuple[int, ...] = (1, 2, 4, 8, 16)
  scheme_kinds: tuple[str, ...] = ("family", "random")
  sharing_levels: tuple[str, ...] = ("none", "attention", "all")
  scheme_seeds: tuple[int, ...] = (0,)
  only: Optional[tuple[str, ...]] = None
  model_overrides: Optional[dict[int, dict[str, Any]]] = None
  equal_total_params: bool = False
  seeds: tuple[int, ...] = (0,)
  forget_languages: Optional[tuple[str, ...]] = None
  shared_forget_languages: Optional[tuple[str, ...]] = None
  optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig()
  unlearning: specs.UnlearningConfig = specs.UnlearningConfig()
  mesh_config: sharding.MeshConfig = sharding.MeshConfig()
  data_seed: int = 0
  materialize_data: bool = True
  max_validation_examples: Optional[int] = None

  def __post_init__(self):
    if self.equal_total_params and self.model_overrides:
      raise ValueError(
          "Sweep.equal_total_params builds every width itself; "
          f"model_overrides={self.model_overrides!r} must then be None."
      )
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(
          f"Sweep.seeds={self.seeds!r}; allowed: distinct ints, at least one."
      )
    for code in self.languages + (self.shared_forget_languages or ()):
      languages.get(code)

  @property
  def languages(self) -> tuple[str, ...]:
    """The forget languages of configurations with strict partitions."""
    return self.forget_languages or (self.unlearning.forget_language,)

  def languages_of(self, config: decoder_config.DecoderConfig):
    """The forget languages of one configuration."""
    shared = config.num_partitions == 1 or config.sharing != "none"
    if shared and self.shared_forget_languages is not None:
      return self.shared_forget_languages
    return self.languages


@dataclasses.dataclass(frozen=True)
class Configuration:
  name: str
  scheme: schemes.PartitionScheme
  model_config: decoder_config.DecoderConfig


def _model(sweep: Sweep, n: int, sharing: str):
  if sweep.equal_total_params:
    base = dataclasses.replace(
        sweep.model_config, num_partitions=1, sharing="none"
    )
    return size_family.member(base, n, sharing)
  overrides = (sweep.model_overrides or {}).get(n, {})
  return dataclasses.replace(
      sweep.model_config, num_partitions=n, sharing=sharing, **overrides
  )


def _schemes(sweep: Sweep, kind: str, n: int):
  if kind != "random":
    return [schemes.make_scheme(kind, n)]
  return [schemes.make_scheme(kind, n, seed) for seed in sweep.scheme_seeds]


def configurations(sweep: Sweep) -> list[Configuration]:
  """The sweep's configurations, without duplicates.

  With one partition every scheme and sharing level is the same model, so
  n = 1 runs once ('family1_none'); with 16 singleton partitions a random
  scheme only renumbers the family one, so n = 16 runs the family scheme.
  Each random scheme seed is a configuration ('random4s0_none', ...).
  """
  out = []
  for n in sweep.num_partitions:
    for kind in sweep.scheme_kinds:
      if (n == 1 and kind != "family") or (n == 16 and kind == "random"):
        continue
      for scheme in _schemes(sweep, kind, n):
        for sharing in sweep.sharing_levels:
          if n == 1 and sharing != "none":
            continue
          config = _model(sweep, n, sharing)
          out.append(
              Configuration(f"{scheme.name}_{sharing}", scheme, config)
          )
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


def data_spec(source: str, scheme: schemes.PartitionScheme) -> specs.DataSpec:
  """The SeqIO names of one configuration's data (tasks must be
  registered: gin/runs/tasks.gin imports the `tasks` package)."""
  return specs.DataSpec(
      partition_names=tuple(
          seqio_names.partition_mixture_names(source, scheme)
      ),
      task_name=functools.partial(seqio_names.task_name, source),
      mixture_name=functools.partial(seqio_names.language_mixture, source),
  )


def _spec(sweep: Sweep, c: Configuration, seed: int) -> specs.TrainSpec:
  return specs.TrainSpec(
      c.model_config,
      sweep.optimizer_config,
      dataclasses.replace(sweep.train_config, seed=seed),
      sweep.batch_size,
      sweep.sequence_length,
  )


def _weights(sweep: Sweep, c: Configuration) -> tuple[float, float]:
  """Estimated cost of (training the original, forgetting one language):
  active parameters x steps; a forget unit retrains the whole model
  (shared parameters), one partition, or nothing (a dropped partition),
  plus the unlearning methods and evaluations (a tenth of a training)."""
  cfg = c.model_config
  train = float(param_count.count_params(cfg).active) * (
      sweep.train_config.train_steps
  )
  shared = cfg.num_partitions == 1 or cfg.sharing != "none"
  one_each = all(len(p) == 1 for p in c.scheme.partitions)
  retrain = 1.0 if shared else (0.0 if one_each else 1 / cfg.num_partitions)
  return train, train * (retrain + 0.1)


class _Runner:
  """Runs (or restores) every unit of a sweep, in order."""

  def __init__(self, sweep: Sweep, output_dir: str, configs):
    self.sweep, self.output_dir = sweep, output_dir
    self.mesh = sharding.make_mesh(sweep.mesh_config)
    self.caches = {}
    todo, total = 0.0, 0
    for job in jobs(sweep, output_dir, configs):
      total += 1 + len(job.result_paths)
      todo += job.remaining_weight()
    self.progress = sweep_progress.Progress(total, todo)

  def cache(self, seed: int) -> stream_cache.DataCache:
    if seed not in self.caches:
      self.caches[seed] = stream_cache.DataCache(
          self.sweep.sequence_length,
          self.sweep.data_seed + _DATA_SEED_STRIDE * seed,
          materialize=self.sweep.materialize_data,
          max_validation_examples=self.sweep.max_validation_examples,
      )
    return self.caches[seed]

  def unlearning(self, code: str, seed: int) -> specs.UnlearningConfig:
    return dataclasses.replace(
        self.sweep.unlearning, forget_language=code, seed=seed
    )

  def run(self, c: Configuration, seed: int) -> list[dict]:
    """Every forget language of (configuration, seed); their payloads."""
    langs = self.sweep.languages_of(c.model_config)
    train, forget = _weights(self.sweep, c)
    paths = {
        l: sweep_jobs.result_path(self.output_dir, c.name, seed, l)
        for l in langs
    }
    todo = [l for l in langs if not sweep_jobs.is_current(paths[l])]
    seed_dir = os.path.join(self.output_dir, "runs", c.name, f"seed{seed}")
    trained = None
    if not todo:
      self.progress.skip()
      logging.info("%s seed %d: done earlier, kept.", c.name, seed)
    for code in langs:
      path = paths[code]
      if code not in todo:
        self.progress.skip()
        continue
      if trained is None:
        trained = configuration.prepare(
            run=c.name, scheme=c.scheme, spec=_spec(self.sweep, c, seed),
            data=data_spec(self.sweep.source, c.scheme),
            config=self.unlearning(code, seed), cache=self.cache(seed),
            work_dir=seed_dir, mesh=self.mesh,
        )
        self.progress.done(train, f"{c.name} seed {seed} trained")
      start = time.time()
      result = runner.forget(
          configuration.for_language(trained, self.unlearning(code, seed)),
          os.path.dirname(path),
      )
      sweep_jobs.save_result(path, result, seed, time.time() - start)
      self.progress.done(forget, f"{c.name} seed {seed} forgot {code}")
    return [sweep_jobs.load_result(paths[l]) for l in langs]


def jobs(
    sweep: Sweep, output_dir: str, configs: list[Configuration]
) -> list[sweep_jobs.Job]:
  """One job per (configuration, seed), in the serial order."""
  out = []
  for c in configs:
    train, forget = _weights(sweep, c)
    for seed in sweep.seeds:
      langs = sweep.languages_of(c.model_config)
      out.append(sweep_jobs.Job(
          c.name, seed,
          os.path.join(output_dir, "runs", c.name, f"seed{seed}"),
          tuple(
              sweep_jobs.result_path(output_dir, c.name, seed, l)
              for l in langs
          ),
          train, forget,
      ))
  return out


def _title(sweep: Sweep) -> str:
  return (
      f"Forgetting {', '.join(sweep.languages)}: {sweep.source} data, "
      f"{len(sweep.seeds)} seed{'s' if len(sweep.seeds) > 1 else ''}"
  )


def _baselines(sweep: Sweep, output_dir: str, units: _Runner):
  return sweep_baselines.baselines(
      os.path.join(output_dir, "baselines.json"),
      units.cache(sweep.seeds[0]),
      functools.partial(seqio_names.task_name, sweep.source),
      sweep.unlearning.eval_split,
      sweep.model_config.vocab_size,
  )


def run_sweep(
    sweep: Sweep,
    output_dir: str,
    launch: Optional[Callable[[], list[sweep_jobs.Process]]] = None,
) -> list[dict]:
  """Runs (or resumes) every unit; returns their payloads.

  Args:
    sweep: what to run.
    output_dir: where.
    launch: None runs the jobs here, one after another; otherwise it
      starts worker processes that each call `run_worker`, and this
      process waits for them (`sweep_jobs.watch`).

  Raises:
    sweep_jobs.WorkersFailed: when a worker failed (finished units are
      kept).
  """
  configs = configurations(sweep)
  units = _Runner(sweep, output_dir, configs)
  baselines = _baselines(sweep, output_dir, units)
  write = lambda payloads: sweep_report.write_outputs(
      output_dir, payloads, _title(sweep), baselines
  )
  if launch is not None:
    todo = jobs(sweep, output_dir, configs)
    sweep_jobs.clear_claims(todo)
    finished = lambda: [
        sweep_jobs.load_result(p)
        for j in todo for p in j.result_paths if sweep_jobs.is_current(p)
    ]
    codes = sweep_jobs.watch(todo, launch(), lambda: write(finished()))
    sweep_jobs.clear_claims(todo)
    failed = [i for i, code in enumerate(codes) if code]
    if failed:
      raise sweep_jobs.WorkersFailed(
          f"Sweep workers {failed} failed (exit codes {codes}); see "
          f"{output_dir}/logs/worker<i>.log. Finished units are kept: "
          "rerun the same command to resume."
      )
    payloads = finished()  # Every unit, in the serial order.
    write(payloads)
    return payloads
  payloads = []
  for c in configs:
    for seed in sweep.seeds:
      payloads += units.run(c, seed)
      write(payloads)
  return payloads


def run_worker(sweep: Sweep, output_dir: str) -> None:
  """Claims and runs jobs until none is left (see `sweep_jobs`)."""
  configs = {c.name: c for c in configurations(sweep)}
  units = _Runner(sweep, output_dir, list(configs.values()))
  for job in sweep_jobs.claim_order(
      jobs(sweep, output_dir, list(configs.values())),
      sweep.only or list(configs),
  ):
    if job.missing() and sweep_jobs.claim(job):
      units.run(configs[job.name], job.seed)
