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
from tiered_routing.eval import language_eval
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import one_partition
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import tradeoff_metrics

Rows = feature_rows.Rows


class Row(NamedTuple):
  """One method's outcome, before it is compared with the references."""

  method: str
  languages: tradeoff_metrics.LanguageResults
  cost: tradeoff_metrics.UnlearningCost
  extra: dict[str, Any]


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


def reference_and_exact(
    c: Trained, work_dir: str, active: int
) -> tuple[tradeoff_metrics.LanguageResults, Row]:
  """The never-saw-it reference's results and the exact method's row."""
  code, cfg, p = c.config.forget_language, c.spec.model_config, c.plan.partition
  if c.strict and c.plan.action == "drop":
    langs = uniform_forget(c.base, code, cfg.vocab_size)
    return langs, Row(
        "exact_drop",
        langs,
        tradeoff_metrics.UnlearningCost(active_params=active),
        {},
    )
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
    tokens = tokens[p : p + 1]
  cost = tradeoff_metrics.UnlearningCost(
      steps=c.spec.train_config.train_steps,
      train_tokens=int(tokens.sum()),
      active_params=active,
  )
  return ref, Row("exact_retrain", ref, cost, extra)


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


def _frequencies(c: Trained, counts) -> tuple[np.ndarray, np.ndarray]:
  """Forget and retain activation frequencies [M, E'] of the experts the
  forget language can reach: its partition's E (private experts) or all
  P * E (sharing 'all'). Retain tokens are those that reach the same
  experts: its partition's other languages, or every other language."""
  code, e = c.config.forget_language, c.spec.model_config.num_experts
  p = c.forget_partition
  if c.spec.model_config.sharing == "all":
    cols = slice(None)
    retained = [x for x in languages.CODES if x != code]
  else:
    cols = slice(p * e, (p + 1) * e)
    retained = [x for x in c.scheme.partitions[p] if x != code]
  ids = [languages.language_id(x) for x in retained]
  fid = languages.language_id(code)
  f_forget = counts.assignments_NxMxE[fid][:, cols] / np.maximum(
      counts.tokens_NxM[fid][:, None], 1
  )
  f_retain = counts.assignments_NxMxE[ids][:, :, cols].sum(0) / np.maximum(
      counts.tokens_NxM[ids].sum(0)[:, None], 1
  )
  return f_forget, f_retain


def _attribution_counts(c: Trained, batches: dict[str, Rows]):
  """Routing counts of the first `attribution_batches` forget and retain
  batches, regrouped into the evaluator's [P', eval rows, L] batches."""
  a = c.config.attribution_batches
  cfg = c.spec.model_config
  counts = None
  for rows in (batches["forget"], batches["retain"]):
    merged = feature_rows.regroup(
        feature_rows.steps_of(rows, a), c.config.eval_rows
    )
    blocks = [[] for _ in range(cfg.num_partitions)]
    touched = [c.forget_partition] if c.strict else range(cfg.num_partitions)
    for i, q in enumerate(touched):
      blocks[q] = [
          {k: v[b, i] for k, v in merged.items()}
          for b in range(len(merged["decoder_input_tokens"]))
      ]
    evaluator = language_eval.LanguageEvaluator(
        cfg, blocks, vocabulary=None, to_device=c.to_device
    )
    result = evaluator.evaluate(
        c.original,
        partitions=[c.forget_partition] if c.strict else None,
        capture_routing=True,
    )
    if counts is None:
      counts = result.routing
    else:
      counts.merge(result.routing)
  return counts


def attribution(
    c: Trained, batches: dict[str, Rows]
) -> tuple[np.ndarray, int, dict[str, Any]]:
  """Forget-critical experts from the trained model's routing.

  Counts the routing of the first `attribution_batches` forget and retain
  unlearning batches and picks experts by `config.attribution`.

  Returns:
    (critical bool [M, P, E'] (True = remove for the forget partition's
    tokens, every partition's under sharing 'all'), forward tokens spent,
    extra columns).
  """
  counts = _attribution_counts(c, batches)
  critical, _ = expert_attribution.critical_experts(
      *_frequencies(c, counts), c.config.attribution
  )
  cfg = c.spec.model_config
  allowed = expert_attribution.router_mask(
      critical,
      cfg.num_partitions,
      partitions=None if cfg.sharing == "all" else [c.forget_partition],
  )
  a = c.config.attribution_batches
  tokens = sum(
      feature_rows.scored_tokens(feature_rows.steps_of(rows, a))
      for rows in batches.values()
  )
  extra = {
      "masked_experts": int(critical.sum()),
      "critical_experts": " ".join(
          f"L{m}:" + ",".join(map(str, np.flatnonzero(row)))
          for m, row in enumerate(critical)
      ),
  }
  return ~allowed, tokens, extra


def mask_method(
    c: Trained,
    critical: np.ndarray,
    active: int,
    tokens: int,
    extra: dict[str, Any],
) -> Row:
  """Masks the forget-critical experts out of the forget partition's router
  (no training; the cost is the attribution's forward passes)."""
  return Row(
      "mask",
      c.score(c.original, ~critical),
      tradeoff_metrics.UnlearningCost(
          forward_tokens=tokens, active_params=active
      ),
      extra,
  )


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
    stop_nll: Optional[float] = None,
) -> Row:
  """Runs one gradient method from the trained parameters.

  Strict partitions unlearn the forget partition as a one-partition model
  (the others cannot change) and are scored on its languages only. With
  `stop_nll` the method stops early (`gradient_methods.unlearn`); its cost
  counts the steps it took.
  """
  ft_config = c.config.finetune
  cfg = c.spec.model_config
  p = c.forget_partition
  model_cfg = one_partition.one_partition_config(cfg) if c.strict else cfg
  start = (
      one_partition.partition_params(c.original, p) if c.strict else c.original
  )
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
      stop_nll,
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
  return Row(method, c.score(params), cost, extra)
