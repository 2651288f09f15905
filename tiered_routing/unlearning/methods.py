"""The unlearning methods, applied to one trained configuration.

`runner.run_configuration` builds a `Context` (settings, the trained
parameters, their evaluation) and calls these in turn; each method returns a
`Row`: its per-language validation results, cost and extra columns. See the
`runner` module docstring for what each method does.
"""

import dataclasses
import math
import os
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import trainer
from tiered_routing.tier1 import one_partition
from tiered_routing.unlearning import exact
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import gradient_methods
from tiered_routing.eval import language_eval
from tiered_routing.unlearning import tradeoff_metrics
from tiered_routing.unlearning import specs
from tiered_routing.data import stream_cache
from tiered_routing.unlearning import trained_models


class Row(NamedTuple):
  """One method's outcome, before it is compared with the references."""

  method: str
  languages: tradeoff_metrics.LanguageResults
  cost: tradeoff_metrics.UnlearningCost
  extra: dict[str, Any]


@dataclasses.dataclass
class Context:
  """One configuration being unlearned: its settings and trained state."""

  run: str
  scheme: schemes.PartitionScheme
  spec: trained_models.TrainSpec
  data: specs.DataSpec
  config: specs.UnlearningConfig
  cache: stream_cache.DataCache
  mesh: Any
  plan: exact.ExactPlan = None
  original: Any = None
  base: language_eval.EvalResult = None
  evaluator: language_eval.LanguageEvaluator = None

  @property
  def strict(self) -> bool:
    return self.spec.model_config.sharing == "none"

  @property
  def p(self) -> int:
    return self.plan.partition

  def to_device(self, batch):
    return trainer.to_global_batch(batch, self.mesh)

  def score(self, params, mask=None) -> tradeoff_metrics.LanguageResults:
    """Every language's results; strict partitions rescore p's only."""
    if not self.strict:
      return self.evaluator.evaluate(params, mask).languages
    part = self.evaluator.evaluate(params, mask, [self.p]).languages
    return {**self.base.languages, **part}


def uniform_forget(
    results: tradeoff_metrics.LanguageResults, code: str, vocab_size: int
) -> tradeoff_metrics.LanguageResults:
  """`results` with `code` scored as a uniform distribution (unroutable)."""
  r = dict(results[code])
  r["loss"] = math.log(vocab_size)
  r["bpb"] = r["loss"] * r["tokens"] / math.log(2) / r["bytes"]
  return {**results, code: r}


def reference_names(c: Context) -> list[Optional[str]]:
  """The reference model's stream per partition: the trained model's, the
  forget partition's without the forget language (None if nothing is left).
  """
  names: list[Optional[str]] = list(c.data.partition_names)
  retained = c.plan.retain_languages
  names[c.p] = (
      c.data.mixture_name(c.plan.routing.name, c.p, retained)
      if retained
      else None
  )
  return names


def reference_and_exact(
    c: Context, work_dir: str, active: int
) -> tuple[tradeoff_metrics.LanguageResults, Row]:
  """The never-saw-it reference's results and the exact method's row."""
  code, cfg = c.config.forget_language, c.spec.model_config
  if c.strict and c.plan.action == "drop":
    langs = uniform_forget(c.base.languages, code, cfg.vocab_size)
    return langs, Row(
        "exact_drop", langs, tradeoff_metrics.UnlearningCost(active_params=active), {}
    )
  params, tokens = trained_models.train_model(
      os.path.join(work_dir, "reference"),
      c.spec,
      reference_names(c),
      c.cache,
      c.mesh,
  )
  ref = c.score(params)
  extra = {}
  if c.strict:
    same = trained_models.identical_except(c.original, params, c.p)
    extra["other_partitions_identical"] = same
    if not same:
      logging.warning(
          "%s: retraining partition %d changed other "
          "partitions' parameters.",
          c.run,
          c.p,
      )
    tokens = tokens[c.p : c.p + 1]
  cost = tradeoff_metrics.UnlearningCost(
      steps=c.spec.train_config.train_steps,
      train_tokens=int(tokens.sum()),
      active_params=active,
  )
  return ref, Row("exact_retrain", ref, cost, extra)


def unlearning_batches(c: Context) -> tuple[stream_cache.Rows, stream_cache.Rows]:
  """Forget and retain batches {feature: [N, P', R, L]} (P' = 1 strict)."""
  ft = c.config.finetune
  n, r = ft.steps, ft.rows_per_batch
  forget = c.cache.stream(
      c.data.task_name(c.config.forget_language), c.config.seed, r, n
  )
  _, rows, _ = c.spec.batch_shape
  touched = [c.p] if c.strict else range(c.spec.model_config.num_partitions)
  names = reference_names(c)
  retain = []
  for q in touched:  # The reference model's first training batches.
    if names[q] is None:
      retain.append(stream_cache.zeros_like(forget))
    else:
      ref = c.cache.stream(
          names[q], c.cache.seed + q, rows, math.ceil(n * r / rows)
      )
      retain.append(stream_cache.rechunk(ref, r, n))
  forgets = [
      forget if q == c.p else stream_cache.zeros_like(forget) for q in touched
  ]
  return stream_cache.stack(forgets, axis=1), stream_cache.stack(retain, axis=1)


def _frequencies(c: Context, counts) -> tuple[np.ndarray, np.ndarray]:
  """Forget and retain activation frequencies [M, E'] of the experts the
  forget language can reach: its partition's E (private experts) or all
  P * E (sharing 'all'). Retain tokens are those that reach the same
  experts: its partition's other languages, or every other language."""
  code, e = c.config.forget_language, c.spec.model_config.num_experts
  if c.spec.model_config.sharing == "all":
    cols = slice(None)
    retained = [x for x in languages.CODES if x != code]
  else:
    cols = slice(c.p * e, (c.p + 1) * e)
    retained = [x for x in c.scheme.partitions[c.p] if x != code]
  ids = [languages.language_id(x) for x in retained]
  fid = languages.language_id(code)
  f_forget = counts.assignments_NxLxE[fid][:, cols] / np.maximum(
      counts.tokens_NxL[fid][:, None], 1
  )
  f_retain = counts.assignments_NxLxE[ids][:, :, cols].sum(0) / np.maximum(
      counts.tokens_NxL[ids].sum(0)[:, None], 1
  )
  return f_forget, f_retain


def attribution(
    c: Context, forget: stream_cache.Rows, retain: stream_cache.Rows
) -> tuple[np.ndarray, int, dict[str, Any]]:
  """Forget-critical experts from the trained model's routing.

  Counts the routing of the first `attribution_batches` forget and retain
  unlearning batches and picks experts by `config.attribution`.

  Returns:
    (critical bool [M, P, E'] (True = remove for the forget partition's
    tokens, every partition's under sharing 'all'), forward tokens spent,
    extra columns).
  """
  a = c.config.attribution_batches
  counts = c.evaluator.new_counts()
  for batches in (forget, retain):
    # The evaluator's batch shape, [P', eval rows, L].
    merged = stream_cache.regroup(
        {k: v[:a] for k, v in batches.items()}, c.config.eval_rows
    )
    c.evaluator.run(
        c.original,
        (
            {k: v[i] for k, v in merged.items()}
            for i in range(len(merged["decoder_input_tokens"]))
        ),
        partition=c.p if c.strict else None,
        counts=counts,
    )
  critical, _ = expert_attribution.critical_experts(
      *_frequencies(c, counts), c.config.attribution
  )
  allowed = expert_attribution.router_mask(
      critical,
      c.spec.model_config.num_partitions,
      partitions=None if c.spec.model_config.sharing == "all" else [c.p],
  )
  tokens = sum(
      stream_cache.scored_tokens({k: v[:a] for k, v in b.items()})
      for b in (forget, retain)
  )
  extra = {
      "masked_experts": int(critical.sum()),
      "critical_experts": " ".join(
          f"L{l}:" + ",".join(map(str, np.flatnonzero(row)))
          for l, row in enumerate(critical)
      ),
  }
  return ~allowed, tokens, extra


def gradient_method(
    c: Context,
    method: str,
    forget: stream_cache.Rows,
    retain: stream_cache.Rows,
    critical: np.ndarray,
    active: int,
    attribution_tokens: int,
    stop_nll: Optional[float] = None,
) -> Row:
  """Runs one gradient method from the trained parameters.

  Strict partitions unlearn the forget partition as a one-partition model
  (the others cannot change) and are scored on its languages only. With
  `stop_nll` the method stops early (`finetune_loop.finetune`); its cost
  counts the steps it took.
  """
  ft_config = c.config.finetune
  cfg = c.spec.model_config
  strict = c.strict
  model_cfg = one_partition.one_partition_config(cfg) if strict else cfg
  ft = gradient_methods.make_finetuner(
      model_cfg, c.spec.optimizer_config, ft_config
  )
  start = (
      one_partition.partition_params(c.original, c.p)
      if strict
      else c.original
  )
  if cfg.sharing == "attention":
    mask = gradient_methods.update_mask(ft.model, start, c.p)
  else:
    mask = jax.tree.map(lambda _: np.ones((), np.float32), start)
  crit = critical[:, c.p : c.p + 1] if strict else critical
  coeffs = ft_config.coefficients(method)
  objective = ft_config.objective_config(method)
  new, history = gradient_methods.finetune(
      ft, start, forget, retain, coeffs, crit, mask, c.to_device, stop_nll
  )
  steps = len(history["forget_nll"])
  forget, retain = (
      {k: v[:steps] for k, v in rows.items()} for rows in (forget, retain)
  )
  params = (
      one_partition.with_partition_params(c.original, c.p, new)
      if strict
      else new
  )
  langs = c.score(params)
  forget_tokens = stream_cache.scored_tokens(forget)
  uses_retain = objective.effective_retain_coeff > 0
  retain_tokens = stream_cache.scored_tokens(retain) if uses_retain else 0
  cost = tradeoff_metrics.UnlearningCost(
      steps=steps,
      train_tokens=forget_tokens + retain_tokens,
      # NPO's reference log-likelihoods; TRACE's attribution.
      forward_tokens=(forget_tokens if objective.name == "npo" else 0)
      + (attribution_tokens if method == "trace" else 0),
      active_params=active,
  )
  extra = {
      "final_forget_nll": float(history["forget_nll"][-1]),
      "final_retain_nll": float(history["retain_nll"][-1]),
      "learning_rate": ft_config.learning_rate,
  }
  return Row(method, langs, cost, extra)
