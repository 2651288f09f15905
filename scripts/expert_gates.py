r"""Adds an expert for a new language to a sequence-gated MoE, then removes one.

  python scripts/expert_gates.py --gin_file=gin/experiments/expert_gates.gin \
      --gin.MODEL_DIR="'/tmp/rm_expert_gates'"

One partition (P = 1). Steps (`tiered_routing.expert_gates`):

  1. Train a base model with router='sequence_gate' on every language but
     NEW_LANGUAGE (trainer library; MODEL_DIR/base, resumable).
  2. Add one expert per MoE layer, copied from the expert the new language's
     sequences score highest, and train only it (weights + gate row) on
     batches holding NEW_LANGUAGE rows (cross-entropy) and old-language rows
     (negatives of the one-vs-rest gate loss).
  3. Check the old languages: validation sequences that do not select the new
     expert must have bit-identical logits.
  4. Remove the added expert (which restores the base model exactly: the new
     language is forgotten) and, separately, the old expert the old languages
     use most (its sequences re-route to their next-best experts).

The table goes to stdout and OUTPUT (default MODEL_DIR/expert_gates.md).
"""

import functools
import os
import sys
from typing import Any, Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import method_runs  # pylint: disable=g-import-not-at-top

from tasks import mixtures
from tiered_routing import configurables  # pylint: disable=unused-import
from tiered_routing import expert_gates
from tiered_routing import expert_params
from tiered_routing import finetune
from tiered_routing import gin_flags
from tiered_routing import inputs
from tiered_routing import languages
from tiered_routing import optimizers
from tiered_routing import partitioning
from tiered_routing import partitions
from tiered_routing import train_state
from tiered_routing import trainer
from tiered_routing.model import transformer
from tiered_routing.unlearning import token_routing

FLAGS = flags.FLAGS
REQUIRED_MACROS = ("MODEL_DIR",)
COLUMNS = (
    "model",
    "experts",
    "new_language_loss",
    "old_languages_loss",
    "old_seqs_on_new_expert",
    "old_seqs_changed",
    "max_abs_logit_diff",
)


def _register_without(code: str) -> str:
  """Registers (once) the sample mixture of every language but `code`."""
  name = f"rm.sample.without_{code}_v1"
  if name not in seqio.MixtureRegistry.names():
    rate = functools.partial(
        seqio.mixing_rate_num_examples, temperature=mixtures.DEFAULT_TEMPERATURE
    )
    tasks = mixtures.task_names(
        "sample", [c for c in languages.CODES if c != code]
    )
    seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])
  return name


def _stream(name, scheme, rows, length, seed):
  return inputs.batch_iterator(
      inputs.partitioned_dataset(
          [name],
          global_batch_size=rows,
          scheme=scheme,
          sequence_length=length,
          seed=seed,
      )
  )


def _mixed_batches(new_task, old_mixture, scheme, new_rows, old_rows, length):
  """[1, new_rows + old_rows, L]: new-language rows, then old ones."""
  new = _stream(new_task, scheme, new_rows, length, 11)
  old = _stream(old_mixture, scheme, old_rows, length, 12)
  for a, b in zip(new, old):
    yield {k: np.concatenate([a[k], b[k]], axis=1) for k in a}


def pad_as_segment(batch: Mapping[str, np.ndarray]) -> dict:
  """Gives each row's padding (segment id 0) a segment id of its own.

  Workaround for NaN gradients of `SequenceGateRouter`'s load-balance loss
  on padding tokens (see .notes/related_methods.md); padding keeps loss
  weight 0, so only routing statistics see it. Remove once the router is
  fixed.
  """
  seg = np.asarray(batch["decoder_segment_ids"])
  fresh = seg.max(axis=-1, keepdims=True) + 1
  return {**batch, "decoder_segment_ids": np.where(seg == 0, fresh, seg)}


def _train_base(
    model_dir, config, opt, scheme, mixture, steps, batch_size, length, mesh
):
  dataset = inputs.partitioned_dataset(
      [mixture],
      global_batch_size=batch_size,
      scheme=scheme,
      sequence_length=length,
      seed=0,
  )
  state = trainer.train(
      model_dir=os.path.join(model_dir, "base"),
      model_config=config,
      optimizer_config=opt,
      config=trainer.TrainConfig(
          train_steps=steps,
          save_every_steps=steps,
          log_every_steps=max(steps // 8, 1),
      ),
      batches=lambda start: map(
          pad_as_segment, inputs.batch_iterator(dataset, start)
      ),
      batch_shape=(1, batch_size, length),
      mesh=mesh,
  )
  return jax.device_get(state.params)


def _train_new_expert(
    config, params, batches, steps, opt, code, gate_weight, mesh
):
  model = transformer.TieredDecoder(config)
  boxed = train_state.param_layout(model, mesh, (1, 1, 8))[0]
  mask = expert_params.trainable_mask(
      params,
      config,
      expert_gates.new_expert_selection(config, (0,)),
      include_router=True,
  )
  tx = expert_params.freeze(
      optimizers.make_optimizer(opt, steps, optimizers.partitioned_mask(boxed)),
      mask,
  )
  step_fn = jax.jit(
      functools.partial(
          expert_gates.new_expert_step,
          model=model,
          tx=tx,
          config=expert_gates.NewExpertConfig(
              languages.language_id(code), gate_weight
          ),
      )
  )
  state = trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
    state, metrics = step_fn(state, batch)
    if (i + 1) % max(steps // 8, 1) == 0:
      logging.info(
          "new expert step %d: %s",
          i + 1,
          {k: round(float(v), 4) for k, v in metrics.items()},
      )
  return jax.device_get(state.params), expert_params.count_trainable(
      params, mask
  )


def _forward_fn(config):
  model = transformer.TieredDecoder(config)

  @jax.jit
  def forward(params, batch):
    logits, routed, _ = token_routing.apply_with_routing(
        model,
        {"params": params},
        batch["decoder_input_tokens"],
        segment_ids_PxBxL=batch["decoder_segment_ids"],
        positions_PxBxL=batch["decoder_positions"],
    )
    return logits, routed

  return forward


def _compare(evaluator, base_config, base, config, params, code, expert):
  """Old-language rows: the share that reach `expert`, the share changed.

  Validation rows hold packed sequences of one language each; a row is 'on
  the expert' if any of its scored tokens reaches it in any layer. Returns
  (on share, changed share, max |logit change| over rows not on it).
  """
  base_fn, fn = _forward_fn(base_config), _forward_fn(config)
  on_expert = changed = total = 0
  max_diff = 0.0
  new_id = languages.language_id(code)
  for batch in evaluator.batches:
    inputs_ = {
        k: jnp.asarray(batch[k])
        for k in (
            "decoder_input_tokens",
            "decoder_segment_ids",
            "decoder_positions",
        )
    }
    old_logits, _ = base_fn(base, inputs_)
    logits, routed = fn(params, inputs_)
    valid = batch["decoder_loss_weights"] > 0
    uses = np.zeros(valid.shape, bool)
    if expert is not None:
      expert_T = jnp.full((valid.size,), expert, jnp.int32)
      uses = np.asarray(expert_gates.uses_expert(routed, expert_T)).reshape(
          valid.shape
      )
    diff_BxL = np.abs(np.asarray(logits) - np.asarray(old_logits)).max(-1)
    diff = np.where(valid, diff_BxL, 0.0).max(-1)
    old_row = (valid & (batch["decoder_language_ids"] != new_id)).any(-1)
    old_row &= ~(valid & (batch["decoder_language_ids"] == new_id)).any(-1)
    row_on = (uses & valid).any(-1)
    on_expert += int((old_row & row_on).sum())
    changed += int((old_row & (diff > 0)).sum())
    total += int(old_row.sum())
    max_diff = max(max_diff, float(diff[old_row & ~row_on].max(initial=0)))
  return on_expert / max(total, 1), changed / max(total, 1), max_diff


@gin.configurable("run", module="expert_gates_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    model_config: transformer.DecoderConfig = gin.REQUIRED,
    new_language: str = "ur",
    base_steps: int = 400,
    new_expert_steps: int = 150,
    batch_size: int = 32,
    new_rows: int = 8,
    length: int = 128,
    learning_rate: float = 3e-3,
    new_expert_learning_rate: float = 3e-3,
    gate_loss_weight: float = 1.0,
    output: Optional[str] = None,
) -> list[dict]:
  """Runs the add / remove experiment (see the module docstring)."""
  if model_config.num_partitions != 1:
    raise ValueError(
        "This script uses one partition; got num_partitions="
        f"{model_config.num_partitions}."
    )
  scheme = partitions.family(1)
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  old_mixture = _register_without(new_language)
  opt = optimizers.OptimizerConfig(learning_rate=learning_rate, warmup_steps=30)
  with partitioning.with_sharding_rules(mesh):
    base = _train_base(
        model_dir,
        model_config,
        opt,
        scheme,
        old_mixture,
        base_steps,
        batch_size,
        length,
        mesh,
    )
    evaluator = method_runs.Evaluator(
        [mixtures.all_languages_mixture("sample")], scheme, length, batch_size
    )
    rows = _experiment(
        evaluator,
        model_config,
        base,
        new_language,
        scheme,
        old_mixture,
        new_expert_steps,
        batch_size,
        new_rows,
        length,
        new_expert_learning_rate,
        gate_loss_weight,
        mesh,
    )
  header = (
      f"Expert-owned sequence gates, {model_dir}: base trained "
      f"{base_steps} steps without {new_language}; the added expert "
      f"trained {new_expert_steps} steps ({new_rows} {new_language} + "
      f"{batch_size - new_rows} old rows per batch). Validation loss "
      "in nats/token (old = mean over the 15 other languages).\n\n"
  )
  text = header + method_runs.markdown_table(rows, COLUMNS) + "\n"
  print(text)
  method_runs.write_text(
      output or os.path.join(model_dir, "expert_gates.md"), text
  )
  return rows


def _experiment(
    evaluator,
    config,
    base,
    code,
    scheme,
    old_mixture,
    steps,
    batch_size,
    new_rows,
    length,
    lr,
    gate_weight,
    mesh,
):
  olds = [c for c in languages.CODES if c != code]
  model = transformer.TieredDecoder(config)
  new_task = mixtures.task_names("sample", [code])[0]
  probe = [next(_stream(new_task, scheme, batch_size, length, 3))]
  counts = finetune.collect_routing(model, base, probe)
  source = finetune.expert_relevance(counts, [code], "gate").argmax(-1)
  grown, grown_config = expert_gates.add_expert(
      base, config, source_experts=source
  )
  opt = optimizers.OptimizerConfig(learning_rate=lr, warmup_steps=10)
  trained, num_trainable = _train_new_expert(
      grown_config,
      grown,
      _mixed_batches(
          new_task, old_mixture, scheme, new_rows, batch_size - new_rows, length
      ),
      steps,
      opt,
      code,
      gate_weight,
      mesh,
  )
  results = []

  def add(name, cfg, params, expert=None):
    res = evaluator.evaluate(transformer.TieredDecoder(cfg), params)
    on, changed, diff = _compare(
        evaluator, config, base, cfg, params, code, expert
    )
    results.append(
        {
            "model": name,
            "experts": cfg.num_experts,
            "new_language_loss": res[f"{code}/loss"],
            "old_languages_loss": method_runs.mean_loss(res, olds),
            "old_seqs_on_new_expert": on if expert is not None else "-",
            "old_seqs_changed": changed,
            "max_abs_logit_diff": diff,
        }
    )

  add("base", config, base)
  add("grown, untrained", grown_config, grown, config.num_experts)
  add(
      f"grown, new expert trained ({num_trainable} params)",
      grown_config,
      trained,
      config.num_experts,
  )
  removed, removed_config = expert_gates.remove_expert(
      trained, grown_config, config.num_experts
  )
  exact = all(jax.tree.leaves(jax.tree.map(np.array_equal, removed, base)))
  add(f"new expert removed (== base: {exact})", removed_config, removed)
  old_counts = finetune.collect_routing(model, base, evaluator.batches)
  busiest = finetune.expert_relevance(old_counts, olds).argmax(-1)
  pruned, pruned_config = expert_gates.remove_expert(base, config, busiest)
  add(f"base minus busiest expert {busiest.tolist()}", pruned_config, pruned)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gin_flags.parse_gin(
      FLAGS.gin_file,
      FLAGS.gin_bindings,
      FLAGS.gin_search_paths,
      REQUIRED_MACROS,
  )
  run()


if __name__ == "__main__":
  app.run(main, flags_parser=gin_flags.parse_flags)
