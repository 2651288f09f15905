"""TRACE: Targeted Routing-Aware Calibration of Experts.

Gradient unlearning on an MoE mostly changes the experts the forget data
routes to (the forget-critical experts, `expert_attribution`). Those experts
also serve some retain tokens, and a plain retain NLL (GradDiff, NPO + retain)
barely constrains them: if 40% of forget tokens but only 4% of retain tokens
reach a critical expert, 96% of the retain signal protects experts the
forget objective hardly touches. TRACE calibrates the retain side to the
forget side by importance reweighting of retain tokens: a retain token that
reaches a critical expert gets weight r = f_forget / f_retain, the others a
weight s chosen so the mean weight stays 1, which makes the weighted retain
activation frequency of the critical experts equal the forget frequency:

  r f_retain + s (1 - f_retain) = 1   =>   s = (1 - r f_retain) / (1 - f_retain)
  weighted frequency = r f_retain / 1 = f_forget.

r is clipped to [w_min, w_max] (and to 1 / f_retain, which keeps s >= 0) so
a handful of retain tokens cannot dominate the loss; then the match holds
only up to the clip. A token "reaches" the critical set if any of its used
slots (combine weight > 0) in any MoE layer picks a critical expert.

The weights depend on routing only and carry no gradient.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from tiered_routing.model import routing_capture
from tiered_routing.unlearning import objectives

FORGET_OBJECTIVES = ("ga", "npo")


def critical_hits(
    routing: routing_capture.TokenRouting,
    critical_MxPxE: jax.Array,
    partition_ids_T: jax.Array,
) -> jax.Array:
  """bool [T]: whether each token uses a critical expert in some layer.

  Args:
    routing: the tokens' routing (M MoE layers, T tokens, K slots).
    critical_MxPxE: bool, expert e of layer l is critical for tokens of tier-1
      partition p (`~expert_attribution.router_mask(...)`).
    partition_ids_T: int tier-1 partition of each token
      (`tier1.layout.token_partition_ids`).
  """
  critical = jnp.asarray(critical_MxPxE, jnp.bool_)
  m, t, _ = routing.expert_index_MxTxK.shape
  if critical.ndim != 3 or critical.shape[0] != m:
    raise ValueError(
        f"critical_MxPxE has shape {critical.shape}; expected "
        f"[M={m}, P, E]."
    )
  if jnp.shape(partition_ids_T) != (t,):
    raise ValueError(
        f"partition_ids_T has shape {jnp.shape(partition_ids_T)};"
        f" expected ({t},)."
    )
  crit_MxTxE = critical[:, partition_ids_T, :]
  hit_MxTxK = jnp.take_along_axis(
      crit_MxTxE, routing.expert_index_MxTxK, axis=-1
  )
  used_MxTxK = routing.combine_weights_MxTxK > 0
  return jnp.any(hit_MxTxK & used_MxTxK, axis=(0, 2))


def activation_frequency(
    hits_T: jax.Array, token_mask_T: jax.Array
) -> jax.Array:
  """Fraction of the masked-in tokens that reach a critical expert."""
  mask = jnp.asarray(token_mask_T).astype(jnp.float32)
  hits = jnp.asarray(hits_T).astype(jnp.float32)
  return jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def retain_token_weights(
    hits_T: jax.Array,
    token_mask_T: jax.Array,
    forget_frequency: jax.Array,
    w_min: float = 0.1,
    w_max: float = 10.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRACE importance weights of retain tokens (see module docstring).

  Args:
    hits_T: bool, retain token reaches a critical expert.
    token_mask_T: bool, real retain tokens (False for padding).
    forget_frequency: f_forget, the forget tokens' activation frequency of
      the critical experts (`activation_frequency` on forget routing).
    w_min, w_max: clip range of the hit weight r.

  Returns:
    (weights_T float32, 0 on padding with mean 1 over real tokens, metrics).
    All weights are 1 when no retain token, or every one, reaches a critical
    expert: then no reweighting can move the frequency.
  """
  if not 0 < w_min <= 1 <= w_max:
    raise ValueError(
        f"Need 0 < w_min <= 1 <= w_max, got w_min={w_min!r}, "
        f"w_max={w_max!r}."
    )
  mask = jnp.asarray(token_mask_T).astype(jnp.float32)
  hits = jnp.asarray(hits_T, jnp.bool_) & (mask > 0)
  f_retain = activation_frequency(hits, mask)
  f_forget = jnp.asarray(forget_frequency, jnp.float32)
  movable = (f_retain > 0) & (f_retain < 1)
  safe_f = jnp.where(movable, f_retain, 0.5)
  r = jnp.clip(f_forget / safe_f, w_min, w_max)
  r = jnp.minimum(r, 1.0 / safe_f)
  s = (1.0 - r * safe_f) / (1.0 - safe_f)
  r, s = jnp.where(movable, r, 1.0), jnp.where(movable, s, 1.0)
  weights = jnp.where(hits, r, s) * mask
  weights = jax.lax.stop_gradient(weights)
  metrics = {
      "trace_forget_frequency": f_forget,
      "trace_retain_frequency": f_retain,
      # sum_t w_t hit_t / sum_t w_t, with sum_t w_t = number of tokens.
      "trace_weighted_retain_frequency": (
          jnp.sum(weights * hits) / jnp.maximum(jnp.sum(mask), 1.0)
      ),
      "trace_hit_weight": r,
      "trace_other_weight": s,
  }
  return weights, metrics


@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """TRACE = a forget objective + importance-reweighted retain NLL.

  Attributes:
    forget_objective: 'ga' (GradDiff with reweighted retain) or 'npo'.
    forget_coeff: weight of the forget term.
    retain_coeff: weight of the reweighted retain NLL (> 0).
    npo_beta: NPO beta (forget_objective 'npo').
    w_min, w_max: clip range of the critical-token weight.
  """

  forget_objective: str = "npo"
  forget_coeff: float = 1.0
  retain_coeff: float = 1.0
  npo_beta: float = 0.1
  w_min: float = 0.1
  w_max: float = 10.0

  def __post_init__(self):
    if self.forget_objective not in FORGET_OBJECTIVES:
      raise ValueError(
          f"TraceConfig.forget_objective={self.forget_objective!r}"
          f" is invalid; allowed: {FORGET_OBJECTIVES}."
      )
    if not self.retain_coeff > 0:
      raise ValueError(
          f"TraceConfig.retain_coeff={self.retain_coeff!r} must "
          "be > 0: TRACE reweights the retain term."
      )
    if not 0 < self.w_min <= 1 <= self.w_max:
      raise ValueError(
          f"TraceConfig needs 0 < w_min <= 1 <= w_max, got "
          f"w_min={self.w_min!r}, w_max={self.w_max!r}."
      )
    self.objective_config()  # Validates the remaining fields.

  def objective_config(self) -> objectives.ObjectiveConfig:
    name = "graddiff" if self.forget_objective == "ga" else "npo"
    return objectives.ObjectiveConfig(
        name,
        forget_coeff=self.forget_coeff,
        retain_coeff=self.retain_coeff,
        npo_beta=self.npo_beta,
    )


def trace_loss(
    config: TraceConfig,
    forget: objectives.TokenLogProbs,
    retain: objectives.TokenLogProbs,
    retain_hits_T: jax.Array,
    forget_frequency: jax.Array,
    ref_forget_logp: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The TRACE objective for one forget batch and one retain batch.

  Args:
    config: TRACE settings.
    forget: current model's forget log-likelihoods.
    retain: current model's retain log-likelihoods; `retain.weights` (0 on
      padding) are multiplied by the TRACE weights.
    retain_hits_T: `critical_hits` of the retain tokens, in the flattened
      order of `retain.logp`.
    forget_frequency: f_forget (scalar).
    ref_forget_logp: reference forget log-likelihoods (NPO).

  Returns:
    (loss, metrics): `objectives.unlearning_loss` metrics plus the TRACE
    frequencies and weights.
  """
  base_w = retain.weights.astype(jnp.float32)
  if jnp.shape(retain_hits_T) != (base_w.size,):
    raise ValueError(
        f"retain_hits_T has shape {jnp.shape(retain_hits_T)}; "
        f"expected ({base_w.size},), one per retain token."
    )
  trace_w, trace_metrics = retain_token_weights(
      retain_hits_T,
      base_w.reshape(-1) > 0,
      forget_frequency,
      config.w_min,
      config.w_max,
  )
  reweighted = retain.replace(weights=base_w * trace_w.reshape(base_w.shape))
  loss, metrics = objectives.unlearning_loss(
      config.objective_config(), forget, reweighted, ref_forget_logp
  )
  metrics.update(trace_metrics)
  return loss, metrics
