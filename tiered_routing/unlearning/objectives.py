"""Gradient-based unlearning objectives over per-token log-likelihoods.

Every objective here is a plain function of log-probability arrays, not of
parameters, so a training loop differentiates it through whatever model
produced the log-probabilities:

  def loss_fn(params):
    logits = forward.forward(model, params, forget_batch).logits_PxBxLxV
    forget = objectives.TokenLogProbs(
        objectives.token_log_likelihood(logits, forget_targets_PxBxL),
        forget_weights_PxBxL)
    ... same for the retain batch ...
    return objectives.unlearning_loss(config, forget, retain)

  grads, metrics = jax.grad(loss_fn, has_aux=True)(params)

(`combined_objective` is that function for the sweep's gradient methods.)

Conventions: `logp` is log p(y_t | y_<t) per target token (<= 0), `weights`
are per-token loss weights (0 = padding; TRACE puts its importance weights
here), and every loss is *minimised*.

Objectives:
  ga        gradient ascent on the forget data (Jang et al. 2023, "Knowledge
            Unlearning for Mitigating Privacy Risks in Language Models"):
            minimise -NLL_forget = mean weighted log-likelihood.
  graddiff  gradient difference (Liu et al. 2022, "Continual Learning and
            Private Unlearning"; the GradDiff baseline of TOFU, Maini et al.
            2024): GA on forget plus NLL on retain.
  npo       negative preference optimization (Zhang et al. 2024, "Negative
            Preference Optimization: From Catastrophic Collapse to Effective
            Unlearning", Sec. 3): (2/beta) E[log(1 + (pi/pi_ref)^beta)] over
            forget *sequences*, optionally plus NLL on retain.
"""

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from tiered_routing.model import losses

OBJECTIVES = ("ga", "graddiff", "npo")

# Default retain coefficient per objective when the config leaves it unset.
_DEFAULT_RETAIN_COEFF = {"ga": 0.0, "graddiff": 1.0, "npo": 0.0}


@flax.struct.dataclass
class TokenLogProbs:
  """Per-token log-likelihoods of one batch and how to weight them.

  Attributes:
    logp: [...] float log p(target | context) per token.
    weights: [...] per-token loss weights, 0 for padding.
    segment_ids: optional [B, L] packing segment ids (0 = padding); NPO uses
      them to sum tokens into sequences. None = every row is one sequence.
  """

  logp: jax.Array
  weights: jax.Array
  segment_ids: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which unlearning objective to minimise and its coefficients.

  Attributes:
    name: one of OBJECTIVES.
    forget_coeff: weight of the forget term.
    retain_coeff: weight of the retain NLL term; None = the objective's
      default (ga: 0, graddiff: 1, npo: 0). 'ga' must have 0.
    npo_beta: NPO inverse temperature beta > 0 (the paper uses 0.1).
  """

  name: str = "graddiff"
  forget_coeff: float = 1.0
  retain_coeff: Optional[float] = None
  npo_beta: float = 0.1

  def __post_init__(self):
    if self.name not in OBJECTIVES:
      raise ValueError(
          f"ObjectiveConfig.name={self.name!r} is invalid; allowed: "
          f"{OBJECTIVES}."
      )
    if not self.forget_coeff >= 0:
      raise ValueError(
          f"ObjectiveConfig.forget_coeff={self.forget_coeff!r} " "must be >= 0."
      )
    if self.retain_coeff is not None and not self.retain_coeff >= 0:
      raise ValueError(
          f"ObjectiveConfig.retain_coeff={self.retain_coeff!r} " "must be >= 0."
      )
    if self.name == "ga" and self.retain_coeff:
      raise ValueError(
          f"ObjectiveConfig.retain_coeff={self.retain_coeff!r} with name='ga';"
          " gradient ascent has no retain term: use name='graddiff'."
      )
    if not self.npo_beta > 0:
      raise ValueError(
          f"ObjectiveConfig.npo_beta={self.npo_beta!r} must be " "> 0."
      )

  @property
  def effective_retain_coeff(self) -> float:
    if self.retain_coeff is None:
      return _DEFAULT_RETAIN_COEFF[self.name]
    return float(self.retain_coeff)


def token_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """float32 log p(target | context) per token from [..., V] logits."""
  _, _, per_token_nll = losses.cross_entropy_loss(logits, targets)
  return -per_token_nll


def _check_same_shape(**arrays) -> None:
  shapes = {name: jnp.shape(a) for name, a in arrays.items() if a is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"Shapes must match, got {shapes}.")


def mean_nll(logp: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean negative log-likelihood per token (0 if no weight)."""
  _check_same_shape(logp=logp, weights=weights)
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  return -jnp.sum(weights * logp.astype(jnp.float32)) / jnp.maximum(total, 1e-8)


def sequence_log_likelihood(
    batch: TokenLogProbs,
) -> tuple[jax.Array, jax.Array]:
  """Sums weighted token log-likelihoods into sequence log-likelihoods.

  Args:
    batch: token log-likelihoods; `logp` is [B, L] when `segment_ids` is set
      (any shape with a last token axis otherwise).

  Returns:
    (seq_logp_Z, seq_mask_Z): log pi(y|x) = sum_t w_t logp_t per sequence and
    whether the sequence has any weighted token. Without segment ids Z is
    the number of rows; with them Z = B * L (slot b * L + id - 1 holds
    segment `id` of row b; unused slots are masked out).
  """
  _check_same_shape(
      logp=batch.logp, weights=batch.weights, segment_ids=batch.segment_ids
  )
  wlogp = batch.weights.astype(jnp.float32) * batch.logp.astype(jnp.float32)
  weights = batch.weights.astype(jnp.float32)
  if batch.segment_ids is None:
    flat = lambda a: a.reshape(-1, a.shape[-1])
    return (jnp.sum(flat(wlogp), axis=-1), jnp.sum(flat(weights), axis=-1) > 0)
  if batch.logp.ndim != 2:
    raise ValueError(
        f"segment_ids need [B, L] log-likelihoods, got shape "
        f"{batch.logp.shape}."
    )
  b, l = batch.logp.shape
  seg = batch.segment_ids.astype(jnp.int32)
  # Padding (id 0) goes to an extra overflow slot that is then dropped.
  slot = jnp.where(seg > 0, jnp.arange(b)[:, None] * l + seg - 1, b * l)
  sum_n = jax.ops.segment_sum(wlogp.ravel(), slot.ravel(), b * l + 1)
  mass_n = jax.ops.segment_sum(weights.ravel(), slot.ravel(), b * l + 1)
  return sum_n[:-1], mass_n[:-1] > 0


def gradient_ascent(
    forget: TokenLogProbs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GA: minimise -NLL_forget, i.e. the weighted mean log-likelihood.

  d loss / d logp_t = w_t / sum(w) >= 0, so a descent step lowers every
  forget token's likelihood. The loss is unbounded below: loops must stop by
  step count or by a target forget loss.
  """
  nll = mean_nll(forget.logp, forget.weights)
  return -nll, {"forget_nll": nll}


def npo_from_sequences(
    seq_logp_Z: jax.Array,
    ref_seq_logp_Z: jax.Array,
    seq_mask_Z: jax.Array,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NPO over sequence log-likelihoods (Zhang et al. 2024, Sec. 3).

  L = (2/beta) mean_i log(1 + exp(beta * r_i)), r_i = log pi(y_i|x_i) -
  log pi_ref(y_i|x_i). Its gradient w.r.t. log pi(y_i|x_i) is
  (2/N) sigmoid(beta r_i): the GA gradient (1/N per sequence) times the
  adaptive weight 2 sigmoid(beta r_i) in (0, 2) (paper, Sec. 3), which is 1 at
  r = 0 (so NPO starts as GA) and vanishes as the sequence is forgotten.
  As beta -> 0 the loss is 2 log(2) / beta + mean_i r_i + O(beta): NPO
  becomes sequence-level GA.
  """
  _check_same_shape(
      seq_logp=seq_logp_Z, ref_seq_logp=ref_seq_logp_Z, seq_mask=seq_mask_Z
  )
  mask = seq_mask_Z.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  # The reference model is frozen: no gradient flows into its likelihoods.
  log_ratio = seq_logp_Z - jax.lax.stop_gradient(ref_seq_logp_Z)
  per_seq = (2.0 / beta) * jax.nn.softplus(beta * log_ratio)
  loss = jnp.sum(mask * per_seq) / count
  metrics = {
      "npo_log_ratio": jnp.sum(mask * log_ratio) / count,
      "npo_weight": (
          jnp.sum(mask * 2 * jax.nn.sigmoid(beta * log_ratio)) / count
      ),
  }
  return loss, metrics


def npo(
    forget: TokenLogProbs, ref_forget_logp: jax.Array, beta: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """NPO on token log-likelihoods, summed into sequences.

  Args:
    forget: the current model's forget log-likelihoods.
    ref_forget_logp: the reference (original) model's log-likelihoods of the
      same tokens; summed with the same weights and segments.
    beta: inverse temperature.
  """
  seq_logp, seq_mask = sequence_log_likelihood(forget)
  ref_seq_logp, _ = sequence_log_likelihood(
      forget.replace(logp=ref_forget_logp)
  )
  loss, metrics = npo_from_sequences(seq_logp, ref_seq_logp, seq_mask, beta)
  metrics["forget_nll"] = mean_nll(forget.logp, forget.weights)
  return loss, metrics


def unlearning_loss(
    config: ObjectiveConfig,
    forget: TokenLogProbs,
    retain: Optional[TokenLogProbs] = None,
    ref_forget_logp: Optional[jax.Array] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """forget_coeff * forget term + retain_coeff * retain NLL.

  Args:
    config: objective and coefficients.
    forget: current model's forget-batch log-likelihoods.
    retain: current model's retain-batch log-likelihoods; needed iff the
      effective retain coefficient is non-zero. Its weights may carry TRACE
      importance weights.
    ref_forget_logp: reference log-likelihoods of the forget batch (NPO).

  Returns:
    (loss, metrics) with 'loss', 'forget_loss', 'forget_nll' and, with a
    retain term, 'retain_nll'; NPO adds 'npo_log_ratio' and 'npo_weight'.
  """
  retain_coeff = config.effective_retain_coeff
  if retain_coeff and retain is None:
    raise ValueError(
        f"Objective {config.name!r} with retain_coeff="
        f"{retain_coeff} needs a retain batch."
    )
  if config.name == "npo":
    if ref_forget_logp is None:
      raise ValueError(
          "Objective 'npo' needs ref_forget_logp, the reference "
          "model's forget log-likelihoods."
      )
    _check_same_shape(logp=forget.logp, ref_forget_logp=ref_forget_logp)
    forget_loss, metrics = npo(forget, ref_forget_logp, config.npo_beta)
  else:
    forget_loss, metrics = gradient_ascent(forget)
  loss = config.forget_coeff * forget_loss
  if retain_coeff:
    retain_nll = mean_nll(retain.logp, retain.weights)
    loss = loss + retain_coeff * retain_nll
    metrics["retain_nll"] = retain_nll
  metrics.update(loss=loss, forget_loss=forget_loss)
  return loss, metrics
