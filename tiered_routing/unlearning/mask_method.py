"""The mask method: find forget-critical experts, mask them in the router.

Attribution counts how often the forget language and the retained
languages reach each expert on the first unlearning batches
(`expert_attribution` picks the experts); the method then removes those
experts from the forget partition's router (every partition's under
sharing 'all'), layer by layer, with no training. The masked model is
scored with the expert capacity scaled for the experts that remain, so
that masking drops no token.
"""

import dataclasses
from typing import Any

import numpy as np

from tiered_routing.data import feature_rows
from tiered_routing.eval import language_eval
from tiered_routing.tier1 import languages
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import methods
from tiered_routing.unlearning import tradeoff_metrics

Rows = feature_rows.Rows
Trained = configuration.TrainedConfiguration


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


def leaves_no_expert(critical_MxPxE: np.ndarray) -> bool:
  """Whether masking `critical_MxPxE` leaves some layer of some partition
  without any expert (the mask method cannot be applied then)."""
  return bool(np.asarray(critical_MxPxE, bool).all(axis=-1).any())


def capacity_for_remaining(cfg, critical_MxPxE: np.ndarray):
  """`cfg` with the expert capacity scaled by E / (E - masked), so that the
  experts left after masking can take every token the masked ones would
  have: the capacity is sized for all E experts, and without this up to
  masked / E of the routed slots would overflow and drop."""
  critical = np.asarray(critical_MxPxE, bool)
  total = critical.shape[-1]
  if leaves_no_expert(critical):
    raise ValueError(f"Masking leaves no expert of {total}.")
  remaining = total - int(critical.sum(-1).max(initial=0))
  return dataclasses.replace(
      cfg, capacity_factor=cfg.capacity_factor * total / remaining
  )


def mask_method(
    c: Trained,
    critical: np.ndarray,
    active: int,
    tokens: int,
    extra: dict[str, Any],
) -> methods.Row:
  """Masks the forget-critical experts out of the forget partition's router
  (no training; the cost is the attribution's forward passes), scored with
  capacity for the remaining experts (`capacity_for_remaining`)."""
  model = methods.Model(
      c.original,
      ~critical,
      capacity_for_remaining(c.spec.model_config, critical),
  )
  return methods.Row(
      "mask",
      c.score(*model),
      tradeoff_metrics.UnlearningCost(
          forward_tokens=tokens, active_params=active
      ),
      extra,
      model,
  )
