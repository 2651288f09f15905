r"""Fine-tunes a MoE checkpoint on one language: full, ESFT and router LoRA.

  python -m tiered_routing.train --gin_file=gin/experiments/esft.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"
  python scripts/finetune.py --gin_file=gin/experiments/esft.gin \
      --gin_file=gin/experiments/finetune.gin \
      --gin.MODEL_DIR="'/tmp/rm_esft'"

Starting from the newest checkpoint of MODEL_DIR, each method trains for
FINETUNE_STEPS on the training split of TARGET_LANGUAGE only
(`tiered_routing.finetune`):

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
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiered_routing.related import method_tables  # pylint: disable=g-import-not-at-top

from tiered_routing.data import seqio_names
from tiered_routing.train import atomic_file
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.model import expert_params
from tiered_routing.related import esft
from tiered_routing.cli import gin_flags
from tiered_routing.data import inputs
from tiered_routing.tier1 import languages
from tiered_routing.train import optimizers
from tiered_routing import sharding
from tiered_routing.tier1 import schemes
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.train import train_state
from tiered_routing.train import trainer
from tiered_routing.train import restore
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer

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


def _target_batches(task, scheme, partition, p, rows, length, seed):
  """[P, rows, L] batches whose partition-`partition` block is the task."""
  names = [task] * p  # Other blocks are zeroed (loss weight 0) below.
  dataset = inputs.partitioned_dataset(
      names,
      global_batch_size=p * rows,
      scheme=scheme,
      sequence_length=length,
      seed=seed,
  )
  for batch in inputs.batch_iterator(dataset):
    keep = (np.arange(p) == partition)[:, None, None]
    batch = dict(batch)
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * keep
    yield batch


def _train(model, params, tx, batches, steps, train_config):
  step_fn = jax.jit(
      functools.partial(
          trainer.train_step, model=model, tx=tx, config=train_config
      )
  )
  state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  for i in range(steps):
    state, metrics = step_fn(state, next(batches), jax.random.key(0))
    if (i + 1) % max(steps // 5, 1) == 0:
      logging.info("step %d loss %.4f", i + 1, float(metrics["loss"]))
  return state.params


def _method(name, model, params, boxed, config, selection, lora_rank, alpha):
  """(model stand-in, initial params, trainable mask, partitioned flags)."""
  partitioned = optimizers.partitioned_mask(boxed)
  if name == "full":
    return model, params, jax.tree.map(lambda _: True, params), partitioned
  if name == "router_lora":
    lora = esft.init_router_lora(
        params, config, lora_rank, jax.random.key(7)
    )
    both = {"base": params, "lora": lora}
    flags_ = {
        "base": partitioned,
        "lora": jax.tree.map(lambda _: config.sharing != "all", lora),
    }
    return (
        esft.FinetuneModel(model, lora_alpha=alpha),
        both,
        esft.lora_trainable_mask(both),
        flags_,
    )
  chosen_MxE, forced_mask = selection[name]
  stand_in = esft.FinetuneModel(model, expert_mask_MxPxE=forced_mask)
  return (
      stand_in,
      params,
      esft.trainable_mask(params, config, chosen_MxE),
      partitioned,
  )


def _selections(model, params, batches, code, partition, coverage):
  """ESFT expert choices (bool [L, P, Ep]) and forced masks per method."""
  config = model.config
  counts = esft.collect_routing(model, params, batches)
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


def _check_methods(methods: Sequence[str]) -> None:
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise ValueError(f"Unknown methods {bad}; allowed: {METHODS}.")


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every method's fine-tuning run shares."""

  model: transformer.TieredDecoder
  params: Any
  boxed: Any  # Logically boxed parameters (partition flags).
  selection: Mapping[str, Any]  # `_selections`.
  evaluator: method_tables.Evaluator
  base: Mapping[str, float]  # The base model's evaluation.
  batches: Any  # () -> iterator over target-language batches.
  code: str
  steps: int
  learning_rate: float  # Constant, no warmup.
  lora_rank: int
  lora_alpha: float


def _tune(ctx: _Context, name: str) -> dict:
  """Fine-tunes with method `name` and returns its table row."""
  stand_in, init, mask, flags_ = _method(
      name,
      ctx.model,
      ctx.params,
      ctx.boxed,
      ctx.model.config,
      ctx.selection,
      ctx.lora_rank,
      ctx.lora_alpha,
  )
  opt = optimizers.OptimizerConfig(
      learning_rate=ctx.learning_rate, warmup_steps=0, schedule="constant"
  )
  tx = expert_params.freeze(
      optimizers.make_optimizer(opt, ctx.steps, flags_), mask
  )
  train_config = trainer.TrainConfig(train_steps=ctx.steps)
  tuned = _train(stand_in, init, tx, ctx.batches(), ctx.steps, train_config)
  res = ctx.evaluator.evaluate(stand_in, tuned)
  if name == "esft_forced":
    # Forcing is a per-request choice for the target language's requests;
    # the other languages are served with the model's own routing (the
    # partition-wide mask would force them onto the target's experts too).
    plain = ctx.evaluator.evaluate(ctx.model, tuned)
    res = {**plain, f"{ctx.code}/loss": res[f"{ctx.code}/loss"]}
  experts = "-"
  if name in ctx.selection:
    per_layer = ctx.selection[name][0].sum(axis=(1, 2))
    experts = "/".join(str(int(n)) for n in per_layer)
  trainable = expert_params.count_trainable(init, mask)
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
    output: Optional[str] = None,
) -> list[dict]:
  """Fine-tunes MODEL_DIR's newest checkpoint with each method (see top)."""
  _check_methods(methods)
  p = model_config.num_partitions
  length = gin_flags.task_feature_length(task_feature_lengths)
  rows, partition = batch_size // p, scheme.partition_of(target_language)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model = transformer.TieredDecoder(model_config)
  task = seqio_names.task_name("sample", target_language)
  batches = functools.partial(_target_batches, task, scheme, partition, p)
  with sharding.with_sharding_rules(mesh):
    step, params = restore.restore_params(model_dir, model_config, mesh=mesh)
    evaluator = method_tables.Evaluator(
        gin_flags.mixture_names(mixture_or_task_name, p), scheme, length, rows
    )
    probe = list(itertools.islice(batches(rows, length, 0), routing_batches))
    selection = _selections(
        model, params, probe, target_language, partition, coverage
    )
    base = evaluator.evaluate(model, params)
    ctx = _Context(
        model=model,
        params=params,
        boxed=train_state.param_layout(model, mesh, (p, rows, length))[0],
        selection=selection,
        evaluator=evaluator,
        base=base,
        batches=functools.partial(batches, rows, length, 1),
        code=target_language,
        steps=steps,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )
    results = [_row("base", base, base, target_language, 0, "-")]
    results += [_tune(ctx, name) for name in methods]
  text = _header(ctx, model_dir, step, coverage)
  text += method_tables.markdown_table(results, COLUMNS) + "\n"
  print(text)
  atomic_file.write_text(output or os.path.join(model_dir, "finetune.md"), text)
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
  return (
      f"Fine-tuning {model_dir} (step {step}) on {ctx.code} for "
      f"{ctx.steps} steps (AdamW, constant lr {ctx.learning_rate}); "
      f"ESFT coverage p={coverage}; router LoRA rank {ctx.lora_rank}. "
      "Validation loss in nats/token; other = mean over the other "
      "languages; gain = base - tuned.\n\n"
  )


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  run()


if __name__ == "__main__":
  app.run(main, flags_parser=gin_flags.parse_flags)
