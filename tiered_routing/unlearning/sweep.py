"""The trade-off sweep: every configuration trained, forgotten and reported.

A `Sweep` (bound by gin in `cli.tradeoff`) lists what to run: the numbers
of partitions, scheme kinds and sharing levels (`configurations` drops the
combinations that are the same model), the model, optimizer and training
settings, and the unlearning settings. `run_sweep` runs (or resumes) every
configuration with `runner.run_configuration`, saving each one's rows as
`runs/<config>/result.json` and rewriting the report files
(`sweep_report.write_outputs`) atomically after every configuration, so a
killed sweep loses at most the configuration it was running.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

from absl import logging

from tiered_routing import sharding
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import atomic_file
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep_report


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Everything a sweep runs.

  Attributes:
    model_config: the model of every configuration (num_partitions and
      sharing are set per configuration; `model_overrides` per n).
    train_config: training of the original and reference models.
    batch_size: global batch B (B/P rows per partition).
    sequence_length: L.
    source: the data source ('sample', 'mc4', 'mc4_json').
    num_partitions: the values of n.
    scheme_kinds: 'family' and / or 'random'.
    sharing_levels: 'none', 'attention', 'all'.
    scheme_seed: seed of the random schemes.
    only: run only these configuration names (None = all).
    model_overrides: {n: {DecoderConfig field: value}}, e.g. the size
      configs' widths per n.
    optimizer_config: the optimizer.
    unlearning: what to forget and how.
    mesh_config: mesh axis sizes.
    data_seed: shuffling and mixing seed.
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
  scheme_seed: int = 0
  only: Optional[tuple[str, ...]] = None
  model_overrides: Optional[dict[int, dict[str, Any]]] = None
  optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig()
  unlearning: specs.UnlearningConfig = specs.UnlearningConfig()
  mesh_config: sharding.MeshConfig = sharding.MeshConfig()
  data_seed: int = 0
  materialize_data: bool = True
  max_validation_examples: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Configuration:
  name: str
  scheme: schemes.PartitionScheme
  model_config: decoder_config.DecoderConfig


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


def result_path(output_dir: str, name: str) -> str:
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
      result_path(output_dir, name), json.dumps(payload, indent=1) + "\n"
  )


def _run_one(sweep, c, cache, mesh, output_dir) -> None:
  """Runs configuration `c` and saves its result."""
  start = time.time()
  spec = specs.TrainSpec(
      c.model_config,
      sweep.optimizer_config,
      sweep.train_config,
      sweep.batch_size,
      sweep.sequence_length,
  )
  path = result_path(output_dir, c.name)
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


def run_sweep(sweep: Sweep, output_dir: str) -> list[dict]:
  """Runs (or resumes) every configuration; returns their payloads."""
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
  for c in configurations(sweep):
    path = result_path(output_dir, c.name)
    if os.path.exists(path):
      logging.info("%s: done earlier, kept.", c.name)
    else:
      _run_one(sweep, c, cache, mesh, output_dir)
    with open(path, encoding="utf-8") as f:
      payloads.append(json.load(f))
    sweep_report.write_outputs(output_dir, payloads, title)
  return payloads
