"""Relearning attacks: how fast does a forgotten language come back?

Approximate unlearning can hide knowledge rather than remove it: a few
fine-tuning steps on a little related data bring it back (Hu et al. 2024,
arXiv 2406.13356; Lynch et al. 2024, arXiv 2402.16835; Deeb and Roger
2024, arXiv 2410.08827). The attack fine-tunes the model that serves the
forget language (its partition alone under strict partitions, else the
whole model) with plain next-token loss on a small budget of text: the
forget language's own training paragraphs (8, 32, 128 of them) or only a
related language's (`audit_sets.related_languages`). The baseline is the
never-saw-it reference under the same attack: how fast a model that never
held the language learns it from that budget.

Each attack runs the one unlearning loop (`gradient_methods.unlearn`) with
the retain term alone (the relearning text as the retain batches) and
records the forget language's held-out NLL after every step. Reported:
the first step at which half of the model's forgotten gap (its held-out
NLL minus the original's) is recovered (0: before any step), `steps + 1`
when it never is (capped), the tokens trained on up to then, and the
fraction recovered after all steps.

The mask method leaves the original's weights in place: the attacker
drops the mask (a routing change) and fine-tunes the original, so it
recovers at step 0. A dropped partition leaves no weights to attack: its
columns are NaN.
"""

import dataclasses
import math
from typing import Optional

import jax
import numpy as np

from tiered_routing.data import feature_rows
from tiered_routing.unlearning import combined_objective
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import held_out_stop
from tiered_routing.unlearning import methods

# A method that raised the served model's held-out forget NLL by less than
# this (nats/token) forgot too little for "the fraction of the forgotten gap
# recovered" to mean anything (the mask method on one partition: 0.04): its
# recovered fraction and steps are NaN.
MIN_GAP_NATS = 0.1


def _coefficients() -> combined_objective.Coefficients:
  """Plain next-token loss on the relearning text (the retain term)."""
  f32 = np.float32
  return combined_objective.Coefficients(
      ga=f32(0.0), npo=f32(0.0), retain=f32(1.0), trace=f32(0.0),
      npo_beta=f32(0.1),
  )


def held_out_batch(c, rows: feature_rows.Rows):
  """The forget language's held-out rows as a device batch [P', N, L]."""
  return c.to_device(methods.forget_partition_rows(c, rows))


@dataclasses.dataclass(frozen=True)
class Attack:
  """One relearning attack: its text and settings.

  Attributes:
    name: column prefix, e.g. 'relearn_32' or 'relearn_related_hi'.
    rows: the relearning paragraphs {feature: [N, L]}.
    steps: optimizer steps.
    rows_per_step: paragraphs per step (cycled through the N).
    learning_rate: constant learning rate.
  """

  name: str
  rows: feature_rows.Rows
  steps: int
  rows_per_step: int
  learning_rate: float


def curve(c, params, attack: Attack, held_out) -> tuple[np.ndarray, int]:
  """Held-out forget NLL of `params` before and after each step of
  `attack`.

  Returns:
    (float64 [steps + 1], tokens trained on per step).
  """
  cfg, start = methods.editable_model(c, params)
  rows = feature_rows.rechunk(
      {k: v[None] for k, v in attack.rows.items()},
      attack.rows_per_step, attack.steps,
  )
  retain = methods.forget_partition_rows(c, rows, axis=1)  # [I, P', B, L]
  config = dataclasses.replace(
      c.config.finetune, steps=attack.steps,
      learning_rate=attack.learning_rate, stop_at_reference=False,
  )
  experts = cfg.experts_per_layer
  critical = np.zeros((len(cfg.moe_layers), cfg.num_partitions, experts), bool)
  everything = jax.tree.map(lambda _: np.ones((), np.float32), start)
  _, history = gradient_methods.unlearn(
      cfg, c.spec.optimizer_config, config, start,
      {"forget": feature_rows.zeros_like(retain), "retain": retain},
      _coefficients(), critical, everything, c.to_device,
      held_out_stop.HeldOutStop(held_out, math.inf),
  )
  tokens = feature_rows.scored_tokens(rows) // attack.steps
  before = held_out_stop.mean_nll(cfg, start, held_out)
  return np.concatenate([[before], history["held_out_forget_nll"]]), tokens


def summary(
    name: str, start: float, original: float, nll: np.ndarray, tokens: int
) -> dict[str, float]:
  """The columns of one attack from its curve.

  Args:
    name: column prefix.
    start: the served model's held-out NLL before the attack.
    original: the original model's on the same rows.
    nll: held-out NLL of the attacked weights before (index 0) and after
      each step.
    tokens: tokens trained on per step.
  """
  gap = start - original
  if not gap > MIN_GAP_NATS:  # Nothing forgotten: nothing to recover.
    return {**nan_summary(name), f"{name}_final_nll": float(nll[-1])}
  target = start - 0.5 * gap
  reached = [s for s, value in enumerate(nll) if value <= target]
  steps = reached[0] if reached else len(nll)
  return {
      f"{name}_steps": float(steps),
      f"{name}_tokens": float(min(steps, len(nll) - 1) * tokens),
      f"{name}_recovered": float((start - nll[-1]) / gap),
      f"{name}_final_nll": float(nll[-1]),
  }


def nan_summary(name: str) -> dict[str, float]:
  """The columns of an attack with nothing to attack."""
  return {
      f"{name}_{k}": math.nan
      for k in ("steps", "tokens", "recovered", "final_nll")
  }


def attack_model(model: Optional[methods.Model]) -> Optional[methods.Model]:
  """What the attacker fine-tunes: the weights, without any mask."""
  return None if model is None else methods.Model(model.params)
