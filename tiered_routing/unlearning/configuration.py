"""One trained configuration of the trade-off sweep, as an immutable record.

Every configuration (n partitions x scheme x sharing level) trains two
models with `train.trainer.train`: the original on its partitions' streams
and the reference ("never saw it") on the same streams with the forget
language removed from its partition's (`data.stream_cache.DataCache`
supplies both). Checkpoints go to `<work_dir>/original` and
`<work_dir>/reference`, so a rerun restores instead of retraining.

`prepare` trains (or restores) the original model, builds the per-language
evaluator on every language's validation rows and scores the original; the
`TrainedConfiguration` it returns is what every unlearning method
(`methods`) starts from.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from tiered_routing import sharding
from tiered_routing.data import eval_data
from tiered_routing.data import stream_cache
from tiered_routing.eval import language_eval
from tiered_routing.eval import routing_counts
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import trainer
from tiered_routing.unlearning import exact
from tiered_routing.unlearning import specs

LanguageResults = language_eval.LanguageResults


def train_model(
    model_dir: str,
    spec: specs.TrainSpec,
    names: Sequence[Optional[str]],
    cache: stream_cache.DataCache,
    mesh,
    first_partition: int = 0,
    init_params=None,
) -> tuple[Any, np.ndarray]:
  """Trains (or restores) a model on one stream per partition (None = none).

  Args:
    model_dir: its checkpoints.
    spec: how it is trained.
    names: one mixture per partition.
    cache: the streams.
    mesh: device mesh.
    first_partition: the partition index of names[0] (the data seed of
      partition q is the cache's seed + q): p for partition p alone.
    init_params: `trainer.train`'s initial parameters; None = the model's
      own init.

  Returns:
    (params, training tokens per partition, int64 [P]; see
    `DataCache.training_batches`).
  """
  if len(names) != spec.model_config.num_partitions:
    raise ValueError(
        f"{len(names)} streams for "
        f"{spec.model_config.num_partitions} partitions."
    )
  _, rows, _ = spec.batch_shape
  batches, tokens = cache.training_batches(
      names, rows, spec.train_config.train_steps, first_partition
  )
  state = trainer.train(
      model_dir=model_dir,
      model_config=spec.model_config,
      optimizer_config=spec.optimizer_config,
      config=spec.train_config,
      batches=batches,
      batch_shape=spec.batch_shape,
      mesh=mesh,
      init_params=init_params,
  )
  return state.params, tokens


@dataclasses.dataclass(frozen=True)
class TrainedConfiguration:
  """A configuration with its original model trained and scored.

  Attributes:
    run: its name, e.g. 'family4_attention'.
    scheme: its tier-1 partition scheme.
    spec: how its models are trained.
    data: SeqIO names of its data.
    config: what to forget and how.
    cache: SeqIO streams shared between configurations.
    mesh: device mesh.
    plan: exact unlearning's bookkeeping (the forget partition, its retained
      languages, the routing table afterwards).
    original: the trained parameters.
    evaluator: every language's validation rows, each by its partition.
    base: the original's per-language validation results.
    base_routing: the original's validation routing (global expert ids).
  """

  run: str
  scheme: schemes.PartitionScheme
  spec: specs.TrainSpec
  data: specs.DataSpec
  config: specs.UnlearningConfig
  cache: stream_cache.DataCache
  mesh: Any
  plan: exact.ExactPlan
  original: Any
  evaluator: language_eval.LanguageEvaluator
  base: LanguageResults
  base_routing: routing_counts.RoutingCounts

  @property
  def strict(self) -> bool:
    return self.spec.model_config.sharing == "none"

  @property
  def forget_partition(self) -> int:
    return self.plan.partition

  def to_device(self, batch):
    return sharding.to_global_batch(batch, self.mesh)

  def score(
      self, params, expert_mask_MxPxE=None, config=None
  ) -> LanguageResults:
    """Every language's results; strict partitions rescore the forget
    partition's languages only (the others cannot have changed). `config`
    overrides the model config (e.g. a larger expert capacity)."""
    if not self.strict:
      return _evaluate(self.evaluator, params, expert_mask_MxPxE, None,
                       config)[0]
    part, _ = _evaluate(
        self.evaluator, params, expert_mask_MxPxE, [self.forget_partition],
        config,
    )
    return {**self.base, **part}


def _evaluate(evaluator, params, mask=None, partitions=None, config=None):
  """(language results, routing) of one evaluation. Routing is always
  captured, so that every evaluation of a model shares one program."""
  result = evaluator.evaluate(
      params,
      expert_mask_MxPxE=mask,
      partitions=partitions,
      capture_routing=True,
      config=config,
  )
  return result.language_results(), result.routing


def check_moe(config) -> None:
  if not config.num_experts:
    raise ValueError(
        "Unlearning by experts needs a MoE model; got "
        f"num_experts={config.num_experts}."
    )


def prepare(
    *,
    run: str,
    scheme: schemes.PartitionScheme,
    spec: specs.TrainSpec,
    data: specs.DataSpec,
    config: specs.UnlearningConfig,
    cache: stream_cache.DataCache,
    work_dir: str,
    mesh,
) -> TrainedConfiguration:
  """Trains (or restores) the original model and scores every language."""
  cfg = spec.model_config
  check_moe(cfg)
  code = config.forget_language
  plan = exact.plan(scheme, code, data.task_name)
  original, _ = train_model(
      os.path.join(work_dir, "original"),
      spec,
      data.partition_names,
      cache,
      mesh,
  )
  validation = cache.validation_rows(
      {x: data.task_name(x) for x in languages.CODES}, config.eval_split
  )
  evaluator = language_eval.LanguageEvaluator(
      cfg,
      eval_data.language_blocks(validation, scheme, config.eval_rows),
      eval_data.vocabulary_of(data.task_name(code)),
      to_device=lambda b: sharding.to_global_batch(b, mesh),
  )
  base, routing = _evaluate(evaluator, original)
  return TrainedConfiguration(
      run, scheme, spec, data, config, cache, mesh, plan, original,
      evaluator, base, routing,
  )


def for_language(
    c: TrainedConfiguration, config: specs.UnlearningConfig
) -> TrainedConfiguration:
  """The same trained configuration, set up to forget
  `config.forget_language` (the original, its evaluator and scores are
  shared by every forget language)."""
  plan = exact.plan(c.scheme, config.forget_language, c.data.task_name)
  return dataclasses.replace(c, config=config, plan=plan)
