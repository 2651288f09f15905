"""The units of a sweep: each (configuration, seed) trained once, then each
forget language forgotten, and the sequential removals where asked for.

`Units.run` does one (configuration, seed): it restores or trains the
original (`configuration.prepare`), forgets each language that has no
current result (`runner.forget`, saved as
`runs/<config>/seed<s>/<lang>/result.json`), and on the sweep's
`sequential_configurations` removes `sequential_languages` in order
(`sequential_removals`, saved as `runs/<config>/seed<s>/sequential/
result.json`). `jobs` lists the same units for the worker processes
(`sweep_jobs`). A sweep is any object with the fields of `sweep.Sweep`
(this module does not import it: `sweep` imports this one).
"""

import dataclasses
import functools
import os

from absl import logging

from tiered_routing import sharding
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.model import param_count
from tiered_routing.tier1 import schemes
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import held_out_store
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import sequential_removals
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep_jobs
from tiered_routing.unlearning import sweep_progress

# Seeds of different training runs draw from well separated data streams.
_DATA_SEED_STRIDE = 1000
SEQUENTIAL = sweep_jobs.SEQUENTIAL


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


def train_spec(sweep, c, seed: int) -> specs.TrainSpec:
  return specs.TrainSpec(
      c.model_config,
      sweep.optimizer_config,
      dataclasses.replace(sweep.train_config, seed=seed),
      sweep.batch_size,
      sweep.sequence_length,
  )


def weights(sweep, c) -> tuple[float, float]:
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


class Units:
  """Runs (or restores) every unit of a sweep, in order."""

  def __init__(self, sweep, output_dir: str, configs, worker: bool = False):
    self.sweep, self.output_dir = sweep, output_dir
    self.mesh = sharding.make_mesh(sweep.mesh_config)
    self.caches = {}
    # Every seed's cache and every process of the sweep scores the same
    # held-out rows: built once, kept in output_dir (`held_out_store`).
    rows = sweep.max_validation_examples
    self.held_out = held_out_store.HeldOutRows(os.path.join(
        output_dir, "held_out_rows",
        f"length{sweep.sequence_length}_rows{'all' if rows is None else rows}"))
    todo, total = 0.0, 0
    for job in jobs(sweep, output_dir, configs):
      total += 1 + len(job.result_paths)
      todo += job.remaining_weight()
    self.progress = sweep_progress.Progress(total, todo, worker=worker)

  def cache(self, seed: int) -> stream_cache.DataCache:
    if seed not in self.caches:
      self.caches[seed] = stream_cache.DataCache(
          self.sweep.sequence_length,
          self.sweep.data_seed + _DATA_SEED_STRIDE * seed,
          materialize=self.sweep.materialize_data,
          max_validation_examples=self.sweep.max_validation_examples,
          held_out=self.held_out,
      )
    return self.caches[seed]

  def unlearning(
      self, name: str, code: str, seed: int
  ) -> specs.UnlearningConfig:
    """Configuration `name`'s settings for forgetting `code`: the audits
    run only where the sweep asks for them (`Sweep.audited`)."""
    config = self.sweep.unlearning
    audits = dataclasses.replace(
        config.audits, enabled=self.sweep.audited(name, code)
    )
    return dataclasses.replace(
        config, forget_language=code, seed=seed, audits=audits
    )

  def run(self, c, seed: int) -> list[dict]:
    """Every unit of (configuration, seed) (`unit_names`); their payloads."""
    names = unit_names(self.sweep, c)
    unit_job = job(self.sweep, self.output_dir, c, seed)
    paths = dict(zip(names, unit_job.result_paths))
    todo = [u for u in names if not unit_job.is_done(paths[u])]
    trained, prepare = None, {}
    if not todo:
      self.progress.skip()
      logging.info("%s seed %d: done earlier, kept.", c.name, seed)
    for unit in names:
      if unit not in todo:
        self.progress.skip()
        continue
      clock = sweep_jobs.UnitClock()
      if trained is None:
        trained = self._prepare(c, seed, names[0])
        # Training (or restoring) the original: recorded with the first
        # unit, so that the payloads sum to the sweep's cost.
        prepare = {f"prepare_{k}": v for k, v in clock.timing().items()}
        self.progress.done(unit_job.train_weight,
                           f"{c.name} seed {seed} trained")
        clock.start()
      path = paths[unit]
      if unit == SEQUENTIAL:
        rows = sequential_removals.run_sequence(
            trained, self.sweep.sequential_languages, os.path.dirname(path)
        )
        sweep_jobs.save_sequential(path, rows, seed, clock.timing(**prepare))
      else:
        result = runner.forget(
            configuration.for_language(
                trained, self.unlearning(c.name, unit, seed)
            ),
            os.path.dirname(path),
        )
        sweep_jobs.save_result(path, result, seed, clock.timing(**prepare))
      prepare = {}
      self.progress.done(unit_job.weight_of(path),
                         f"{c.name} seed {seed} {_verb(unit)}")
    return [sweep_jobs.load_result(paths[u]) for u in names]

  def _prepare(self, c, seed: int, code: str):
    """The configuration's original, trained or restored."""
    if code == SEQUENTIAL:
      code = self.sweep.sequential_languages[0]
    return configuration.prepare(
        run=c.name, scheme=c.scheme, spec=train_spec(self.sweep, c, seed),
        data=data_spec(self.sweep.source, c.scheme),
        config=self.unlearning(c.name, code, seed), cache=self.cache(seed),
        work_dir=os.path.join(
            self.output_dir, "runs", c.name, f"seed{seed}"
        ),
        mesh=self.mesh,
    )


def _sequence_weight(sweep, forget: float) -> float:
  """A sequence costs about one forget unit per request."""
  return forget * len(sweep.sequential_languages)


def _verb(unit: str) -> str:
  return "removed in sequence" if unit == SEQUENTIAL else f"forgot {unit}"


def unit_names(sweep, c) -> list[str]:
  """The configuration's forget languages, then 'sequential' when it is
  one of the sweep's `sequential_configurations`."""
  names = list(sweep.languages_of(c.model_config))
  if c.name in (sweep.sequential_configurations or ()):
    names.append(SEQUENTIAL)
  return names


def audited_units(sweep, c) -> set[str]:
  """The forget languages of configuration `c` whose units run the
  audits."""
  return {u for u in unit_names(sweep, c)
          if u != SEQUENTIAL and sweep.audited(c.name, u)}


def job(sweep, output_dir: str, c, seed: int) -> sweep_jobs.Job:
  """The job of (configuration `c`, seed): its units' result paths, the
  audited ones among them, and its estimated costs."""
  train, forget = weights(sweep, c)
  audited = audited_units(sweep, c)
  path = functools.partial(sweep_jobs.result_path, output_dir, c.name, seed)
  return sweep_jobs.Job(
      c.name, seed,
      os.path.join(output_dir, "runs", c.name, f"seed{seed}"),
      tuple(path(u) for u in unit_names(sweep, c)),
      train, forget, _sequence_weight(sweep, forget),
      tuple(path(u) for u in unit_names(sweep, c) if u in audited),
  )


def jobs(
    sweep, output_dir: str, configs: list
) -> list[sweep_jobs.Job]:
  """One job per (configuration, seed), in the serial order."""
  return [job(sweep, output_dir, c, seed)
          for c in configs for seed in sweep.seeds]
