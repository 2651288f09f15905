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
from typing import Any, Callable, Optional

from tiered_routing import sharding
from tiered_routing.data import seqio_names
from tiered_routing.model import decoder_config
from tiered_routing.model import size_family
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep_baselines
from tiered_routing.unlearning import sweep_jobs
from tiered_routing.unlearning import sweep_report
from tiered_routing.unlearning import sweep_units


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
    sequential_configurations: configurations (strict partitions) whose
      every seed also removes `sequential_languages` one after another
      (`sequential_removals`).
    sequential_languages: the removal requests, in order.
    audit_configurations: configurations whose forget units are put
      through the audits (`unlearning.audits`, `forget_audits`); None =
      every configuration. The attacks multiply a unit's cost, so the cpu
      preset audits where they answer the question (issue 14's sizing).
    audit_forget_languages: forget languages audited; None = every one.
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
  sequential_configurations: tuple[str, ...] = ()
  sequential_languages: tuple[str, ...] = ()
  audit_configurations: Optional[tuple[str, ...]] = None
  audit_forget_languages: Optional[tuple[str, ...]] = None

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
    for code in (self.languages + (self.shared_forget_languages or ())
                 + self.sequential_languages
                 + (self.audit_forget_languages or ())):
      languages.get(code)
    if self.sequential_configurations and (
        len(set(self.sequential_languages)) < max(
            2, len(self.sequential_languages))):
      raise ValueError(
          f"Sweep.sequential_languages={self.sequential_languages!r}; "
          "allowed: at least two distinct codes when "
          "sequential_configurations is set."
      )

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

  def audited(self, name: str, code: str) -> bool:
    """Whether configuration `name`'s unit forgetting `code` runs the
    audits."""
    return (
        self.unlearning.audits.enabled
        and (self.audit_configurations is None
             or name in self.audit_configurations)
        and (self.audit_forget_languages is None
             or code in self.audit_forget_languages)
    )


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
  _check_names(sweep, [c.name for c in out])
  if sweep.only is not None:
    out = [c for c in out if c.name in sweep.only]
  _check_sequential(sweep, out)
  return out


def _check_names(sweep: Sweep, names: list[str]) -> None:
  """`only` and `audit_configurations` name configurations the sweep
  produces (before `only` filters them)."""
  for field in ("only", "audit_configurations"):
    unknown = [n for n in getattr(sweep, field) or () if n not in names]
    if unknown:
      raise ValueError(
          f"tradeoff.sweep.{field} names {unknown}, which the "
          f"sweep does not produce; it produces {names}."
      )


def _check_sequential(sweep: Sweep, configs: list[Configuration]) -> None:
  """Sequential removals need configurations of the sweep with strict
  partitions (the exact model after k removals is then partition
  retrains, `sequential_removals`)."""
  strict = [c.name for c in configs if c.model_config.sharing == "none"]
  bad = [n for n in sweep.sequential_configurations if n not in strict]
  if bad:
    raise ValueError(
        f"tradeoff.sweep.sequential_configurations names {bad}; allowed: "
        f"configurations of this sweep with sharing 'none': {strict}."
    )


def _title(sweep: Sweep) -> str:
  return sweep_report.title(sweep.languages, sweep.source, len(sweep.seeds))


def _baselines(sweep: Sweep, output_dir: str, units: sweep_units.Units):
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
  units = sweep_units.Units(sweep, output_dir, configs)
  baselines = _baselines(sweep, output_dir, units)
  write = lambda payloads: sweep_report.write_outputs(
      output_dir, payloads, _title(sweep), baselines
  )
  if launch is not None:
    todo = sweep_units.jobs(sweep, output_dir, configs)
    sweep_jobs.clear_claims(todo)
    finished = lambda: [
        sweep_jobs.load_result(p)
        for j in todo for p in j.result_paths if j.is_done(p)
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
  units = sweep_units.Units(
      sweep, output_dir, list(configs.values()), worker=True
  )
  for job in sweep_jobs.claim_order(
      sweep_units.jobs(sweep, output_dir, list(configs.values())),
      sweep.only or list(configs),
  ):
    if job.missing() and sweep_jobs.claim(job):
      units.run(configs[job.name], job.seed)
