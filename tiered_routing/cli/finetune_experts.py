r"""Fine-tunes a MoE checkpoint on one language: full, ESFT and router LoRA.

  python -m tiered_routing.train --gin_file=gin/experiments/esft.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"
  python -m tiered_routing.cli.finetune_experts \
      --gin_file=gin/experiments/esft.gin \
      --gin_file=gin/experiments/finetune.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"

(`scripts/finetune.py` runs this binary too.) Starting from the newest
checkpoint of MODEL_DIR, each method trains for FINETUNE_STEPS on the
training split of TARGET_LANGUAGE only, in the one training loop
(`train.loop`) on the LM objective (`related.esft`):

  full            every parameter.
  esft_token      ESFT with token-selection-ratio relevance (Wang et al.
                  2024): only the experts that cover a share p of the
                  language's routing per layer; everything else frozen.
  esft_gate       the same with mean-gate-weight relevance.
  esft_forced     esft_token plus forced routing: the language's tokens may
                  use the chosen experts only (in training and in its own
                  evaluation; the other languages keep their own routing).
  router_lora     rank-r LoRA adapters on the router kernels only.

The table reports the target language's validation loss, the mean of the
other languages' (forgetting), and the number of trainable parameters; it
goes to stdout and OUTPUT (default MODEL_DIR/finetune.md).
"""

import dataclasses
import functools
import itertools
import os
from typing import Any, Mapping, Optional, Sequence

from absl import flags
import gin
import jax
import numpy as np

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.cli import user_errors
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.model import transformer
from tiered_routing.related import esft
from tiered_routing.related import method_tables
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import loop
from tiered_routing.train import optimizers
from tiered_routing.train import restore
from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state

FLAGS = flags.FLAGS
REQUIRED_MACROS = (
    "MODEL_DIR",
    "MIXTURE_OR_TASK_NAME",
    "BATCH_SIZE",
    "TASK_FEATURE_LENGTHS",
)
METHODS = ("full", "esft_token", "esft_gate", "esft_forced", "router_lora")
COLUMNS = (
    "method",
    "trainable_params",
    "experts_per_layer",
    "target_loss",
    "other_loss",
    "target_gain",
    "other_change",
)


def _target_batches(task, partition, p, rows, length, seed):
  """[P, rows, L] batches whose partition-`partition` block is the task."""
  names = [task] * p  # Other blocks are zeroed (loss weight 0) below.
  dataset = pipeline.partitioned_dataset(
      names,
      global_batch_size=p * rows,
      sequence_length=length,
      seed=seed,
  )
  for batch in pipeline.batch_iterator(dataset):
    keep = (np.arange(p) == partition)[:, None, None]
    batch = dict(batch)
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * keep
    yield batch


@dataclasses.dataclass(frozen=True)
class _Method:
  """One fine-tuning method as data."""

  init: Any  # The initial trained parameters.
  mask: Any  # Bool tree: which entries train.
  partitioned: Any  # Partition-wise optimizer flags.
  expert_mask_MxPxE: Optional[np.ndarray] = None  # Forced routing.
  params_view: Any = None  # Router LoRA: adapters merged into the model's.


def _method(name, params, boxed, config, selection, lora_rank, alpha):
  """The method `name` (see the module doc) from the base parameters."""
  partitioned = optimizers.partitioned_mask(boxed)
  if name == "full":
    return _Method(params, jax.tree.map(lambda _: True, params), partitioned)
  if name == "router_lora":
    lora = esft.init_router_lora(
        params, config, lora_rank, jax.random.key(7)
    )
    both = {"base": params, "lora": lora}
    flags_ = {
        "base": partitioned,
        "lora": jax.tree.map(lambda _: config.sharing != "all", lora),
    }
    return _Method(
        both, esft.lora_trainable_mask(both), flags_,
        params_view=esft.lora_view(alpha),
    )
  chosen, forced_mask = selection[name]
  mask = esft.trainable_mask(params, config, chosen)
  return _Method(params, mask, partitioned, expert_mask_MxPxE=forced_mask)


def _selections(config, params, batches, code, partition, coverage):
  """ESFT expert choices (bool [M, P, Ep]) and forced masks per method."""
  counts = esft.collect_routing(config, params, batches)
  out = {}
  for name, score in (
      ("esft_token", "token"),
      ("esft_gate", "gate"),
      ("esft_forced", "token"),
  ):
    chosen = esft.select_experts(
        esft.expert_relevance(counts, [code], score), coverage
    )
    forced = (
        esft.forced_routing_mask(chosen, config, [partition])
        if name == "esft_forced"
        else None
    )
    out[name] = (esft.to_selection(chosen, config, [partition]), forced)
  return out


def _check(model_config, scheme, task_feature_lengths) -> tuple[int, int]:
  """(P, L) of a run whose scheme and model agree on P."""
  p = model_config.num_partitions
  gin_flags.check_scheme(scheme, p)
  return p, gin_flags.task_feature_length(task_feature_lengths)


def _check_methods(methods: Sequence[str]) -> None:
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise ValueError(f"Unknown methods {bad}; allowed: {METHODS}.")


@dataclasses.dataclass(frozen=True)
class _Settings:
  """How every method trains."""

  steps: int
  learning_rate: float  # Constant, no warmup.
  lora_rank: int
  lora_alpha: float
  seed: int


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every method's fine-tuning run shares."""

  model: transformer.TieredDecoder
  params: Any
  boxed: Any  # Logically boxed parameters (partition flags).
  selection: Mapping[str, Any]  # `_selections`.
  evaluator: language_eval.LanguageEvaluator
  base: Mapping[str, float]  # The base model's evaluation.
  batches: Any  # () -> iterator over target-language batches.
  code: str
  settings: _Settings


def _tune(ctx: _Context, name: str) -> dict:
  """Fine-tunes with method `name` and returns its table row."""
  config, settings = ctx.model.config, ctx.settings
  m = _method(
      name, ctx.params, ctx.boxed, config, ctx.selection, settings.lora_rank,
      settings.lora_alpha,
  )
  opt = optimizers.OptimizerConfig(
      learning_rate=settings.learning_rate,
      warmup_steps=0,
      schedule="constant",
  )
  tx = optimizers.make_optimizer(opt, settings.steps, m.partitioned)
  objective = steps_lib.LmObjective(
      ctx.model,
      steps_lib.TrainConfig(train_steps=settings.steps),
      expert_mask_MxPxE=m.expert_mask_MxPxE,
      params_view=m.params_view,
  )
  tuned = loop.train_params(
      objective,
      tx,
      m.init,
      m.mask,
      ctx.batches(),
      steps=settings.steps,
      rng=jax.random.key(settings.seed),
      hooks=[loop.log_metrics(name, settings.steps // 5)],
  )
  tuned = objective.model_params(tuned)
  res = ctx.evaluator.evaluate(
      tuned, expert_mask_MxPxE=m.expert_mask_MxPxE
  ).flat()
  if name == "esft_forced":
    # Forcing is a per-request choice for the target language's requests;
    # the other languages are served with the model's own routing (the
    # partition-wide mask would force them onto the target's experts too).
    plain = ctx.evaluator.evaluate(tuned).flat()
    res = {**plain, f"{ctx.code}/loss": res[f"{ctx.code}/loss"]}
  experts = "-"
  if name in ctx.selection:
    per_layer = ctx.selection[name][0].sum(axis=(1, 2))
    experts = "/".join(str(int(n)) for n in per_layer)
  trainable = expert_params.count_trainable(m.init, m.mask)
  return _row(name, res, ctx.base, ctx.code, trainable, experts)


@gin.configurable("run", module="finetune_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: Any = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    target_language: str = "ur",
    steps: int = 100,
    learning_rate: float = 1e-3,
    coverage: float = 0.5,
    lora_rank: int = 4,
    lora_alpha: float = 8.0,
    routing_batches: int = 4,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    output: Optional[str] = None,
) -> list[dict]:
  """Fine-tunes MODEL_DIR's newest checkpoint with each method (see top)."""
  _check_methods(methods)
  p, length = _check(model_config, scheme, task_feature_lengths)
  rows, partition = batch_size // p, scheme.partition_of(target_language)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model = transformer.TieredDecoder(model_config)
  task = seqio_names.task_name("sample", target_language)
  batches = functools.partial(_target_batches, task, partition, p)
  with sharding.with_sharding_rules(mesh):
    step, params = restore.restore_params(model_dir, model_config, mesh=mesh)
    evaluator = language_eval.split_evaluator(
        model_config,
        gin_flags.mixture_names(mixture_or_task_name, p),
        length,
        rows,
        partitions_alone=False,
    )
    probe = list(itertools.islice(batches(rows, length, 0), routing_batches))
    ctx = _Context(
        model=model,
        params=params,
        boxed=train_state.param_layout(model, mesh, (p, rows, length))[0],
        selection=_selections(
            model_config, params, probe, target_language, partition, coverage
        ),
        evaluator=evaluator,
        base=evaluator.evaluate(params).flat(),
        batches=functools.partial(batches, rows, length, 1),
        code=target_language,
        settings=_Settings(steps, learning_rate, lora_rank, lora_alpha, seed),
    )
    results = [_row("base", ctx.base, ctx.base, target_language, 0, "-")]
    results += [_tune(ctx, name) for name in methods]
  method_tables.write_table(
      output or os.path.join(model_dir, "finetune.md"),
      _header(ctx, model_dir, step, coverage),
      results,
      COLUMNS,
  )
  return results


def _row(name, res, base, code, trainable, experts):
  others = [c for c in languages.CODES if c != code and f"{c}/loss" in res]
  target, other = res[f"{code}/loss"], method_tables.mean_loss(res, others)
  return {
      "method": name,
      "trainable_params": trainable,
      "experts_per_layer": experts,
      "target_loss": target,
      "other_loss": other,
      "target_gain": base[f"{code}/loss"] - target,
      "other_change": other - method_tables.mean_loss(base, others),
  }


def _header(ctx: _Context, model_dir: str, step: int, coverage: float) -> str:
  s = ctx.settings
  return (
      f"Fine-tuning {model_dir} (step {step}) on {ctx.code} for "
      f"{s.steps} steps (AdamW, constant lr {s.learning_rate}); "
      f"ESFT coverage p={coverage}; router LoRA rank {s.lora_rank}. "
      "Validation loss in nats/token; other = mean over the other "
      "languages; gain = base - tuned.\n\n"
  )


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
