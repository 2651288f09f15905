"""The unlearning methods, applied to one trained configuration.

Each function takes the immutable `configuration.TrainedConfiguration` and
returns a `Row`: the method's per-language validation results, its cost and
extra columns. See the `runner` module docstring for what each method does.
"""

import math
import os
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from tiered_routing.data import feature_rows
from tiered_routing.model import transformer
from tiered_routing.tier1 import one_partition
from tiered_routing.train import train_state
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import held_out_stop as held_out_stop_lib
from tiered_routing.unlearning import tradeoff_metrics

Rows = feature_rows.Rows


class Model(NamedTuple):
  """What a method leaves to serve the languages: parameters, and for the
  mask method the expert mask and the config it is scored with."""

  params: Any
  expert_mask_MxPxE: Optional[np.ndarray] = None
  config: Optional[Any] = None


class Row(NamedTuple):
  """One method's outcome, before it is compared with the references.

  `model` is what the audits (`forget_audits`) attack; None when the forget
  partition was dropped (the language has no model at all)."""

  method: str
  languages: tradeoff_metrics.LanguageResults
  cost: tradeoff_metrics.UnlearningCost
  extra: dict[str, Any]
  model: Optional[Model] = None


Trained = configuration.TrainedConfiguration


def uniform_forget(
    results: tradeoff_metrics.LanguageResults, code: str, vocab_size: int
) -> tradeoff_metrics.LanguageResults:
  """`results` with `code` scored as a uniform distribution (unroutable)."""
  r = dict(results[code])
  r["loss"] = math.log(vocab_size)
  r["bpb"] = r["loss"] * r["tokens"] / math.log(2) / r["bytes"]
  return {**results, code: r}


def reference_names(c: Trained) -> list[Optional[str]]:
  """The reference model's stream per partition: the trained model's, the
  forget partition's without the forget language (None if nothing is left).
  """
  names: list[Optional[str]] = list(c.data.partition_names)
  p, retained = c.forget_partition, c.plan.retain_languages
  names[p] = (
      c.data.mixture_name(c.plan.routing.name, p, retained)
      if retained
      else None
  )
  return names


class Reference(NamedTuple):
  """The never-saw-it reference model: its results, the exact method's
  row and its parameters (None when the partition was dropped)."""

  languages: tradeoff_metrics.LanguageResults
  exact_row: Row
  params: Optional[Any]


def reference_and_exact(c: Trained, work_dir: str, active: int) -> Reference:
  """Trains (or restores) the reference; it is also the exact method."""
  code, cfg, p = c.config.forget_language, c.spec.model_config, c.plan.partition
  if c.strict and c.plan.action == "drop":
    langs = uniform_forget(c.base, code, cfg.vocab_size)
    row = Row(
        "exact_drop",
        langs,
        tradeoff_metrics.UnlearningCost(active_params=active),
        {},
    )
    return Reference(langs, row, None)
  if c.strict:
    params, tokens = _retrain_partition(c, work_dir)
  else:
    params, tokens = configuration.train_model(
        os.path.join(work_dir, "reference"),
        c.spec,
        reference_names(c),
        c.cache,
        c.mesh,
    )
  ref = c.score(params)
  extra = {}
  if c.strict:
    same = one_partition.identical_except(c.original, params, p)
    extra["other_partitions_identical"] = same
    if not same:
      logging.warning(
          "%s: retraining partition %d changed other partitions' "
          "parameters.",
          c.run,
          p,
      )
  cost = tradeoff_metrics.UnlearningCost(
      steps=c.spec.train_config.train_steps,
      train_tokens=int(tokens.sum()),
      active_params=active,
  )
  row = Row("exact_retrain", ref, cost, extra, Model(params))
  return Reference(ref, row, params)


def _retrain_partition(c: Trained, work_dir: str) -> tuple[Any, np.ndarray]:
  """Strict partitions: partition p retrained alone without the forget
  language, from the initialization it had, on the stream it had (SISA);
  the other partitions are the original's. Returns (params, tokens [1]).

  Trained alone it costs 1/P of the whole model; its loss is scaled by 1/P
  so that it sees the gradients it had inside the P-partition model
  (`steps.TrainConfig.loss_scale`)."""
  cfg, p = c.spec.model_config, c.forget_partition
  init = train_state.partition_init(
      transformer.TieredDecoder(cfg), p, c.spec.batch_shape
  )
  params, tokens = configuration.train_model(
      os.path.join(work_dir, "reference"),
      c.spec.partition_alone(),
      [reference_names(c)[p]],
      c.cache,
      c.mesh,
      first_partition=p,
      init_params=init,
  )
  return one_partition.with_partition_params(c.original, p, params), tokens


def unlearning_batches(c: Trained) -> dict[str, Rows]:
  """{'forget', 'retain'}: {feature: [I, P', B, L]} (P' = 1 strict)."""
  ft = c.config.finetune
  n, r = ft.steps, ft.rows_per_batch
  forget = c.cache.stream(
      c.data.task_name(c.config.forget_language), c.config.seed, r, n
  )
  _, rows, _ = c.spec.batch_shape
  p = c.forget_partition
  touched = [p] if c.strict else range(c.spec.model_config.num_partitions)
  names = reference_names(c)
  retain = []
  for q in touched:  # The reference model's first training batches.
    if names[q] is None:
      retain.append(feature_rows.zeros_like(forget))
    else:
      ref = c.cache.stream(
          names[q], c.cache.seed + q, rows, math.ceil(n * r / rows)
      )
      retain.append(feature_rows.rechunk(ref, r, n))
  forgets = [
      forget if q == p else feature_rows.zeros_like(forget) for q in touched
  ]
  return {
      "forget": feature_rows.stack(forgets, axis=1),
      "retain": feature_rows.stack(retain, axis=1),
  }


def editable_model(c: Trained, params: Any) -> tuple[Any, Any]:
  """(config, params) of the model the gradient methods update: the
  forget partition alone under strict partitions, else the whole model."""
  cfg, p = c.spec.model_config, c.forget_partition
  if c.strict:
    return (
        one_partition.one_partition_config(cfg),
        one_partition.partition_params(params, p),
    )
  return cfg, params


def forget_partition_rows(c: Trained, rows: Rows, axis: int = 0) -> Rows:
  """Rows ([.., B, L], the batch axis at `axis`) laid out for
  `editable_model`: a partition axis of 1 under strict partitions, else
  the forget partition's block of P, the others all-zero rows."""
  if c.strict:
    return {k: np.expand_dims(v, axis) for k, v in rows.items()}
  return feature_rows.place_block(
      rows, c.forget_partition, c.spec.model_config.num_partitions, axis
  )


def held_out_stop(
    c: Trained, reference: Reference
) -> held_out_stop_lib.HeldOutStop:
  """The gradient methods' stopping rule: the forget language's first
  `stop_rows` rows of `stop_split`, in the forget partition's block, and
  the reference's NLL on them (log V when the partition was dropped,
  and never above it)."""
  code = c.config.forget_language
  rows = c.cache.validation_rows(
      {code: c.data.task_name(code)}, split=c.config.stop_split
  )[code]
  rows = {k: v[: c.config.stop_rows] for k, v in rows.items()}
  batch = c.to_device(forget_partition_rows(c, rows))
  uniform = math.log(c.spec.model_config.vocab_size)
  if reference.params is None:
    return held_out_stop_lib.HeldOutStop(batch, uniform)
  cfg, params = editable_model(c, reference.params)
  target = held_out_stop_lib.mean_nll(cfg, params, batch)
  return held_out_stop_lib.HeldOutStop(batch, min(target, uniform))


def _update_mask(model_cfg, start, partition):
  """The forget partition's update mask under sharing 'attention'; all ones
  otherwise, so every method runs with a mask (one compiled step whether or
  not an update is confined to a partition)."""
  if model_cfg.sharing == "attention":
    model = transformer.TieredDecoder(model_cfg)
    return gradient_methods.update_mask(model, start, partition)
  return jax.tree.map(lambda _: np.ones((), np.float32), start)


def _gradient_cost(
    objective, method, used, taken, active, attribution_tokens
) -> tradeoff_metrics.UnlearningCost:
  """A gradient method's cost: the tokens of the `taken` steps it trained on
  (`used` batches), plus NPO's reference and TRACE's attribution forward
  passes."""
  forget_tokens = feature_rows.scored_tokens(used["forget"])
  uses_retain = objective.effective_retain_coeff > 0
  retain_tokens = (
      feature_rows.scored_tokens(used["retain"]) if uses_retain else 0
  )
  return tradeoff_metrics.UnlearningCost(
      steps=taken,
      train_tokens=forget_tokens + retain_tokens,
      forward_tokens=(forget_tokens if objective.name == "npo" else 0)
      + (attribution_tokens if method == "trace" else 0),
      active_params=active,
  )


def gradient_method(
    c: Trained,
    method: str,
    batches: dict[str, Rows],
    critical: np.ndarray,
    active: int,
    attribution_tokens: int,
    stop: Optional[held_out_stop_lib.HeldOutStop] = None,
) -> Row:
  """Runs one gradient method from the trained parameters.

  Strict partitions unlearn the forget partition as a one-partition model
  (the others cannot change) and are scored on its languages only. With
  `stop` the method stops at the target held-out forget NLL
  (`gradient_methods.unlearn`); its cost counts the steps it took.
  """
  ft_config = c.config.finetune
  p = c.forget_partition
  model_cfg, start = editable_model(c, c.original)
  mask = _update_mask(model_cfg, start, p)
  new, history = gradient_methods.unlearn(
      model_cfg,
      c.spec.optimizer_config,
      ft_config,
      start,
      batches,
      ft_config.coefficients(method),
      critical[:, p : p + 1] if c.strict else critical,
      mask,
      c.to_device,
      stop,
  )
  taken = len(history["forget_nll"])
  params = (
      one_partition.with_partition_params(c.original, p, new)
      if c.strict
      else new
  )
  cost = _gradient_cost(
      ft_config.objective_config(method),
      method,
      {k: feature_rows.steps_of(v, taken) for k, v in batches.items()},
      taken,
      active,
      attribution_tokens,
  )
  extra = {
      "final_forget_nll": float(history["forget_nll"][-1]),
      "final_retain_nll": float(history["retain_nll"][-1]),
      "learning_rate": ft_config.learning_rate,
  }
  if stop is not None:
    held_out = float(history["held_out_forget_nll"][-1])
    extra.update(
        held_out_forget_nll=held_out,
        held_out_target_nll=stop.target_nll,
        reached_target=held_out >= stop.target_nll,
    )
  return Row(method, c.score(params), cost, extra, Model(params))
