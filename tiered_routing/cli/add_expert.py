r"""Adds an expert for a new language to a sequence-gated MoE, then removes one.

  python -m tiered_routing.cli.add_expert \
      --gin_file=gin/experiments/expert_gates.gin \
      --gin.MODEL_DIR="'/tmp/rm_expert_gates'"

(`scripts/expert_gates.py` runs this binary too.) One partition (P = 1).
Steps (`related.expert_gates`; training in the one loop, `train.loop`):

  1. Train a base model with router='sequence_gate' on every language but
     NEW_LANGUAGE (trainer library; MODEL_DIR/base, resumable).
  2. Add one expert per MoE layer, copied from the expert that carries the
     most combine weight per NEW_LANGUAGE token (ESFT-Gate relevance on one
     batch; routing is per token, on each token's causal prefix), and train
     only it (weights + gate row) on batches holding NEW_LANGUAGE rows
     (cross-entropy) and old-language rows (negatives of the per-token
     one-vs-rest gate loss).
  3. Check the old languages: validation rows none of whose tokens reaches
     the new expert in any layer must have bit-identical logits, and so must
     every token with no token of its sequence at or before it on the new
     expert (routing is causal); the table gives both, per row and per token.
  4. Remove the added expert (which restores the base model exactly: the new
     language is forgotten) and, separately, the old expert the old languages
     use most (its tokens re-route to their next-best experts).

The table goes to stdout and OUTPUT (default MODEL_DIR/expert_gates.md).
"""

import dataclasses
import os
from typing import Optional

from absl import flags
import gin
import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import user_errors
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.model import transformer
from tiered_routing.related import esft
from tiered_routing.related import expert_gates
from tiered_routing.related import method_tables
from tiered_routing.tier1 import languages
from tiered_routing.train import loop
from tiered_routing.train import optimizers
from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state
from tiered_routing.train import trainer

FLAGS = flags.FLAGS
REQUIRED_MACROS = ("MODEL_DIR",)
COLUMNS = (
    "model",
    "experts",
    "new_language_loss",
    "old_languages_loss",
    "old_seqs_on_expert",
    "old_seqs_changed",
    "max_abs_logit_diff",
    "old_tokens_on_expert",
    "old_tokens_changed",
    "max_abs_prefix_diff",
)
_INPUTS = ("decoder_input_tokens", "decoder_segment_ids", "decoder_positions")


def _register_without(code: str) -> str:
  """Registers (once) the sample mixture of every language but `code`."""
  tasks = [
      seqio_names.task_name("sample", c) for c in languages.CODES if c != code
  ]
  return seqio_names.register_mixture(f"rm.sample.without_{code}_v1", tasks)


def _stream(name, rows, length, seed):
  return pipeline.batch_iterator(
      pipeline.partitioned_dataset(
          [name], global_batch_size=rows, sequence_length=length, seed=seed
      )
  )


def _mixed_batches(new_task, old_mixture, new_rows, old_rows, length):
  """[1, new_rows + old_rows, L]: new-language rows, then old ones."""
  new = _stream(new_task, new_rows, length, 11)
  old = _stream(old_mixture, old_rows, length, 12)
  for a, b in zip(new, old):
    yield {k: np.concatenate([a[k], b[k]], axis=1) for k in a}


def _train_base(model_dir, config, opt, mixture, steps, shape, mesh):
  """Trains (or resumes) the base model in MODEL_DIR/base; its params."""
  batch_size, length = shape
  dataset = pipeline.partitioned_dataset(
      [mixture], global_batch_size=batch_size, sequence_length=length, seed=0
  )
  state = trainer.train(
      model_dir=os.path.join(model_dir, "base"),
      model_config=config,
      optimizer_config=opt,
      config=steps_lib.TrainConfig(
          train_steps=steps,
          save_every_steps=steps,
          log_every_steps=max(steps // 8, 1),
      ),
      batches=lambda start: pipeline.batch_iterator(dataset, start),
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
  tx = optimizers.make_optimizer(
      opt, steps, optimizers.partitioned_mask(boxed)
  )
  objective = expert_gates.NewExpertObjective(
      model,
      expert_gates.NewExpertConfig(languages.language_id(code), gate_weight),
  )
  trained = loop.train_params(
      objective,
      tx,
      params,
      mask,
      batches,
      steps=steps,
      rng=jax.random.key(0),  # Unused: the objective is deterministic.
      to_device=lambda b: {k: jnp.asarray(v) for k, v in b.items()},
      hooks=[loop.log_metrics("new expert", steps // 8)],
  )
  return jax.device_get(trained), expert_params.count_trainable(
      params, mask
  )


def _on_added(expert: int):
  """Rows on the added expert: tokens reaching `expert` in any layer."""

  def on(base_routed, routed):
    del base_routed
    expert_T = jnp.full(routed.expert_index_MxTxK.shape[1], expert, jnp.int32)
    return expert_gates.uses_expert(routed, expert_T)

  return on


def _on_removed(experts_M):
  """Rows on a removed expert: tokens the base sent to experts_M[l] in l."""

  def on(base_routed, routed):
    del routed
    hit = (
        base_routed.expert_index_MxTxK == jnp.asarray(experts_M)[:, None, None]
    )
    return (hit & (base_routed.combine_weights_MxTxK != 0)).any(axis=(0, 2))

  return on


def _reached_in_segment(on_RxL, segment_RxL) -> np.ndarray:
  """bool [R, L]: token t or an earlier token of its segment is on.

  Segments are contiguous runs of one id in a row (packed rows).
  """
  count_Rx1pL = np.pad(np.cumsum(on_RxL, axis=-1), ((0, 0), (1, 0)))
  prev_RxL = np.pad(segment_RxL, ((0, 0), (1, 0)), constant_values=-1)
  start_RxL = segment_RxL != prev_RxL[:, :-1]
  t_L = np.arange(on_RxL.shape[-1])
  first_RxL = np.maximum.accumulate(np.where(start_RxL, t_L, 0), axis=-1)
  before_RxL = np.take_along_axis(count_Rx1pL, first_RxL, -1)
  return count_Rx1pL[:, 1:] > before_RxL


def _compare_tokens(evaluator, before, after, exclude, on_fn=None):
  """Token-level twin of `method_tables.compare_rows` (routing is per token).

  Returns:
    (share of old-language scored tokens on the expert, share whose logits
    changed at all, max |logit change| over those with no token on the
    expert at or before them in their sequence: 0.0 = bit-identical).
  """
  (base_config, base), (config, params) = before, after
  base_fn = method_tables.forward_fn(base_config)
  fn = method_tables.forward_fn(config)
  excluded = languages.language_id(exclude)
  on = changed = total = 0
  max_diff = 0.0
  for batch, _ in evaluator.full_batches():
    inputs = {k: jnp.asarray(batch[k]) for k in _INPUTS}
    old_logits, base_routed = base_fn(base, inputs)
    logits, routed = fn(params, inputs)
    length = batch["decoder_input_tokens"].shape[-1]
    old = (batch["decoder_loss_weights"] > 0) & (
        batch["decoder_language_ids"] != excluded
    )
    old = old.reshape(-1, length)
    uses = np.zeros(old.shape, bool)
    if on_fn is not None:
      uses = np.asarray(on_fn(base_routed, routed)).reshape(old.shape)
    diff = np.abs(np.asarray(logits) - np.asarray(old_logits)).max(-1)
    diff = diff.reshape(old.shape)  # Per token: max over the vocabulary.
    reached = _reached_in_segment(
        uses, np.asarray(batch["decoder_segment_ids"]).reshape(old.shape)
    )
    on += int((old & uses).sum())
    changed += int((old & (diff > 0)).sum())
    total += int(old.sum())
    max_diff = max(max_diff, float(diff[old & ~reached].max(initial=0)))
  return on / max(total, 1), changed / max(total, 1), max_diff


@gin.configurable("run", module="expert_gates_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
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
  mesh = sharding.make_mesh(sharding.MeshConfig())
  old_mixture = _register_without(new_language)
  new_task = seqio_names.task_name("sample", new_language)
  opt = optimizers.OptimizerConfig(learning_rate=learning_rate, warmup_steps=30)
  new_opt = dataclasses.replace(
      opt, learning_rate=new_expert_learning_rate, warmup_steps=10
  )
  mixed = _mixed_batches(
      new_task, old_mixture, new_rows, batch_size - new_rows, length
  )
  with sharding.with_sharding_rules(mesh):
    shape = (batch_size, length)
    base = _train_base(
        model_dir, model_config, opt, old_mixture, base_steps, shape, mesh
    )
    data = (next(_stream(new_task, batch_size, length, 3)), mixed)
    training = (new_expert_steps, new_opt, gate_loss_weight)
    grown = _grow_and_train(
        model_config, base, new_language, data, training, mesh
    )
    evaluator = language_eval.split_evaluator(
        model_config,
        [seqio_names.all_languages_mixture("sample")],
        length,
        batch_size,
        partitions_alone=False,
    )
    rows = _evaluate_all(evaluator, model_config, base, new_language, *grown)
  header = (
      f"Expert-owned sequence gates, {model_dir}: base trained "
      f"{base_steps} steps without {new_language}; the added expert "
      f"trained {new_expert_steps} steps ({new_rows} {new_language} + "
      f"{batch_size - new_rows} old rows per batch). Validation loss "
      "in nats/token (old = mean over the 15 other languages).\n\n"
  )
  path = output or os.path.join(model_dir, "expert_gates.md")
  method_tables.write_table(path, header, rows, COLUMNS)
  return rows


def _grow_and_train(config, base, code, data, training, mesh):
  """Adds an expert copied from the new language's favourite and trains it.

  The favourite, per MoE layer, is the expert with the largest mean combine
  weight over the probe batch's new-language tokens.

  Args:
    config: the base model's config.
    base: its parameters.
    code: the new language.
    data: (one new-language batch to pick the source expert, an iterator of
      mixed training batches).
    training: (steps, optimizer config, gate loss weight).
    mesh: device mesh.

  Returns:
    (grown config, grown params, trained params, trainable entries).
  """
  probe, batches = data  # A new-language batch; mixed training batches.
  steps, opt, gate_weight = training
  counts = esft.collect_routing(config, base, [probe])
  source = esft.expert_relevance(counts, [code], "gate").argmax(-1)
  grown, grown_config = expert_gates.add_expert(
      base, config, source_experts=source
  )
  trained, num_trainable = _train_new_expert(
      grown_config, grown, batches, steps, opt, code, gate_weight, mesh
  )
  return grown_config, grown, trained, num_trainable


def _evaluate_all(
    evaluator, config, base, code, grown_config, grown, trained, num_trainable
):
  """The table rows: base, grown (untrained / trained), experts removed."""
  olds = [c for c in languages.CODES if c != code]
  results = []

  def add(name, cfg, params, on_fn=None):
    res = evaluator.evaluate(params, config=cfg).flat()
    on, changed, diff = method_tables.compare_rows(
        evaluator, (config, base), (cfg, params), code, on_fn
    )
    tokens = _compare_tokens(
        evaluator, (config, base), (cfg, params), code, on_fn
    )
    results.append(
        {
            "model": name,
            "experts": cfg.num_experts,
            "new_language_loss": res[f"{code}/loss"],
            "old_languages_loss": method_tables.mean_loss(res, olds),
            "old_seqs_on_expert": on if on_fn is not None else "-",
            "old_seqs_changed": changed,
            "max_abs_logit_diff": diff,
            "old_tokens_on_expert": tokens[0] if on_fn is not None else "-",
            "old_tokens_changed": tokens[1],
            "max_abs_prefix_diff": tokens[2],
        }
    )

  new = _on_added(config.num_experts)
  add("base", config, base)
  add("grown, untrained", grown_config, grown, new)
  trained_name = f"grown, new expert trained ({num_trainable} params)"
  add(trained_name, grown_config, trained, new)
  removed, removed_config = expert_gates.remove_expert(
      trained, grown_config, config.num_experts
  )
  exact = all(jax.tree.leaves(jax.tree.map(np.array_equal, removed, base)))
  add(f"new expert removed (== base: {exact})", removed_config, removed)
  old_counts = esft.collect_routing(
      config, base, [batch for batch, _ in evaluator.full_batches()]
  )
  busiest = esft.expert_relevance(old_counts, olds).argmax(-1)
  pruned, pruned_config = expert_gates.remove_expert(base, config, busiest)
  pruned_name = f"base minus busiest expert {busiest.tolist()}"
  add(pruned_name, pruned_config, pruned, _on_removed(busiest))
  return results


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
