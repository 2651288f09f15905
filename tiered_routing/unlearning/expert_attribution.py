"""Forget-critical experts from routing statistics, and masks that remove them.

Expert attribution asks which experts of each MoE layer the forget language
depends on. Following the activation-based attribution of ESFT (Wang et al.
2024, "Let the Expert Stick to His Last", token selection ratio) and SEUF/UOE
(Zhuang et al. 2025, "Is Unlearning One Expert Enough for Mixture-of-Experts
LLMs?"), an expert's relevance is read off how often the router sends forget
tokens to it; unlike those papers we also contrast with the retain data,
because an expert every language uses is not *specific* to the forget
language and masking it costs utility everywhere.

Statistics are per-token activation frequencies f[l, e] = (tokens routed to
expert e in layer l) / (tokens), from `routing_counts` summed over batches or
from the sown 'expert_usage_E' metric. Scores (`SCORES`):
  log_ratio         log((f_forget + a) / (f_retain + a)): specificity. The
                    additive smoothing a = smoothing * mean_e f_retain[l, e]
                    (K/E for top-K routing without drops) keeps experts that
                    both sides barely use from getting extreme ratios and
                    makes the score independent of K and E. The default.
  difference        f_forget - f_retain: specificity weighted by volume.
  forget_frequency  f_forget alone (ESFT-Token / SEUF attribution).
Selections (`SELECTIONS`): the top m per layer, a score threshold, or, as
ESFT's cumulative top-p, experts in decreasing score until they carry a given
share of the forget routing. A selection may never remove every expert of a
layer.

Masks follow the router convention (bool, True = allowed) with shape
[M, P, E], M the MoE layers in order (the layers of `TokenRouting`): row p
applies to tokens of tier-1 partition p. That is the decoder's per-layer
`expert_mask_MxPxE`, so each layer loses only its own critical experts
(`decoder_mask_kwargs`); `shared_layer_mask` collapses the layers into one
`expert_mask_PxE` for callers that want a single mask, at the price of
over-masking.
"""

import dataclasses
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.model import routing_capture

SCORES = ("log_ratio", "difference", "forget_frequency")
SELECTIONS = ("top_m", "threshold", "coverage")
WEIGHTINGS = ("count", "mass")


def routing_counts(
    routing: routing_capture.TokenRouting,
    num_experts: int,
    token_mask_T: Optional[jax.Array] = None,
    weighting: str = "count",
) -> tuple[jax.Array, jax.Array]:
  """Per-layer expert activation counts over the selected tokens.

  Args:
    routing: captured routing of T tokens through M MoE layers.
    num_experts: E (experts per MoE layer, P * E under sharing 'all').
    token_mask_T: bool, which tokens to count (e.g. forget-language tokens,
      not padding); None = all.
    weighting: 'count' (number of tokens routed to e) or 'mass' (sum of
      their combine weights, the "average gate score" of ESFT-Gate).

  Returns:
    (counts_MxE float32, number of counted tokens); sum them over batches and
    divide to get frequencies.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(
        f"weighting={weighting!r} is invalid; allowed: " f"{WEIGHTINGS}."
    )
  t = routing.num_tokens
  mask_T = (
      jnp.ones((t,), jnp.float32)
      if token_mask_T is None
      else jnp.asarray(token_mask_T).astype(jnp.float32)
  )
  if mask_T.shape != (t,):
    raise ValueError(
        f"token_mask_T has shape {mask_T.shape}; expected ({t},)"
        " (one entry per routed token)."
    )
  w = routing.combine_weights_MxTxK
  slot_MxTxK = w if weighting == "mass" else (w > 0).astype(jnp.float32)
  slot_MxTxK = slot_MxTxK * mask_T[None, :, None]
  onehot = jax.nn.one_hot(routing.expert_index_MxTxK, num_experts)
  counts_MxE = jnp.einsum("ltk,ltke->le", slot_MxTxK, onehot)
  return counts_MxE, jnp.sum(mask_T)


def _check_frequencies(**arrays) -> None:
  shapes = {name: np.shape(a) for name, a in arrays.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
    raise ValueError(
        f"Frequencies must be [M, E] arrays of one shape, got " f"{shapes}."
    )
  for name, a in arrays.items():
    a = np.asarray(a)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
      raise ValueError(f"{name} must be finite and >= 0, got {a.tolist()}.")


def expert_scores(
    forget_freq_MxE,
    retain_freq_MxE,
    score: str = "log_ratio",
    smoothing: float = 0.1,
) -> np.ndarray:
  """float64 [M, E] forget-criticality scores (higher = more critical)."""
  if score not in SCORES:
    raise ValueError(f"score={score!r} is invalid; allowed: {SCORES}.")
  if not smoothing > 0:
    raise ValueError(f"smoothing={smoothing!r} must be > 0.")
  _check_frequencies(
      forget_freq_MxE=forget_freq_MxE, retain_freq_MxE=retain_freq_MxE
  )
  f = np.asarray(forget_freq_MxE, np.float64)
  r = np.asarray(retain_freq_MxE, np.float64)
  if score == "forget_frequency":
    return f
  if score == "difference":
    return f - r
  # Smoothing in units of the mean retain frequency; falls back to the
  # forget side when the retain data never reached the layer.
  scale = r.mean(axis=1, keepdims=True)
  scale = np.where(scale > 0, scale, f.mean(axis=1, keepdims=True))
  a = smoothing * np.where(scale > 0, scale, 1.0)
  return np.log((f + a) / (r + a))


def _check_leaves_one(critical_MxE: np.ndarray, how: str) -> np.ndarray:
  full = np.flatnonzero(critical_MxE.all(axis=1))
  if full.size:
    raise ValueError(
        f"Selection {how} marks every expert of layer(s) "
        f"{full.tolist()} critical; at least one must stay "
        "routable."
    )
  return critical_MxE


def select_top_m(scores_MxE, m: int) -> np.ndarray:
  """bool [M, E]: the m highest-scoring experts of every layer."""
  scores = np.asarray(scores_MxE)
  e = scores.shape[-1]
  if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < e:
    raise ValueError(
        f"top_m={m!r} must be an int in [0, {e}) (num_experts="
        f"{e}; one expert must stay routable)."
    )
  # Stable sort on -score: ties go to the lower expert index.
  order = np.argsort(-scores, axis=-1, kind="stable")[:, :m]
  critical = np.zeros(scores.shape, bool)
  np.put_along_axis(critical, order, True, axis=-1)
  return critical


def select_threshold(scores_MxE, threshold: float) -> np.ndarray:
  """bool [M, E]: experts whose score is >= threshold."""
  critical = np.asarray(scores_MxE) >= threshold
  return _check_leaves_one(critical, f"threshold={threshold!r}")


def select_by_coverage(
    scores_MxE, forget_freq_MxE, coverage: float
) -> np.ndarray:
  """bool [M, E]: per layer, top-scoring experts until they carry `coverage`.

  Experts are taken in decreasing score until their share of the layer's
  forget routing mass reaches `coverage` (ESFT's cumulative threshold p).
  """
  if not 0 < coverage <= 1:
    raise ValueError(f"coverage={coverage!r} must be in (0, 1].")
  scores = np.asarray(scores_MxE)
  f = np.asarray(forget_freq_MxE, np.float64)
  if scores.shape != f.shape:
    raise ValueError(
        f"scores_MxE has shape {scores.shape}, forget_freq_MxE "
        f"{f.shape}; they must match."
    )
  order = np.argsort(-scores, axis=-1, kind="stable")
  share = np.take_along_axis(f, order, -1) / np.maximum(
      f.sum(-1, keepdims=True), 1e-30
  )
  before = np.cumsum(share, axis=-1) - share
  # Take an expert while the mass already taken is short of the target.
  take = (before < coverage - 1e-12) & (f.sum(-1, keepdims=True) > 0)
  critical = np.zeros(scores.shape, bool)
  np.put_along_axis(critical, order, take, axis=-1)
  return _check_leaves_one(critical, f"coverage={coverage!r}")


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
  """How forget-critical experts are chosen (see module docstring).

  Attributes:
    score: one of SCORES.
    smoothing: additive smoothing of 'log_ratio', in mean frequencies.
    selection: one of SELECTIONS.
    top_m: experts per layer for 'top_m'.
    threshold: minimum score for 'threshold'.
    coverage: forget routing share for 'coverage'.
  """

  score: str = "log_ratio"
  smoothing: float = 0.1
  selection: str = "top_m"
  top_m: int = 1
  threshold: float = 0.0
  coverage: float = 0.5

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(
          f"AttributionConfig.score={self.score!r} is invalid; "
          f"allowed: {SCORES}."
      )
    if self.selection not in SELECTIONS:
      raise ValueError(
          f"AttributionConfig.selection={self.selection!r} is "
          f"invalid; allowed: {SELECTIONS}."
      )


def critical_experts(
    forget_freq_MxE,
    retain_freq_MxE,
    config: AttributionConfig = AttributionConfig(),
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (critical bool [M, E], scores float64 [M, E])."""
  scores = expert_scores(
      forget_freq_MxE, retain_freq_MxE, config.score, config.smoothing
  )
  if config.selection == "top_m":
    critical = select_top_m(scores, config.top_m)
  elif config.selection == "threshold":
    critical = select_threshold(scores, config.threshold)
  else:
    critical = select_by_coverage(scores, forget_freq_MxE, config.coverage)
  return critical, scores


def router_mask(
    critical_MxE,
    num_partitions: int,
    partitions: Optional[Sequence[int]] = None,
    base_mask_PxE=None,
) -> np.ndarray:
  """bool [M, P, E] router masks (True = allowed) without critical experts.

  The result is `TieredDecoder`'s `expert_mask_MxPxE` (entry l masks MoE
  layer l); see `decoder_mask_kwargs`.

  Args:
    critical_MxE: experts to remove, per MoE layer.
    num_partitions: P.
    partitions: tier-1 partitions whose tokens lose the critical experts; the
      forget language's partition when experts are private to a partition
      (sharing 'none' / 'attention'); None = all partitions (sharing 'all',
      where every partition can reach every expert).
    base_mask_PxE: an existing mask to intersect with, e.g. the block-diagonal
      tier-1 mask under sharing 'all'.
  """
  critical = np.asarray(critical_MxE, bool)
  if critical.ndim != 2:
    raise ValueError(
        f"critical_MxE must be [M, E], got shape " f"{critical.shape}."
    )
  if (
      isinstance(num_partitions, bool)
      or not isinstance(num_partitions, int)
      or num_partitions < 1
  ):
    raise ValueError(f"num_partitions={num_partitions!r} must be an int >= 1.")
  rows = range(num_partitions) if partitions is None else partitions
  bad = [p for p in rows if not 0 <= p < num_partitions]
  if bad:
    raise ValueError(
        f"partitions {bad} out of range; allowed: 0.." f"{num_partitions - 1}."
    )
  l, e = critical.shape
  allowed = np.ones((l, num_partitions, e), bool)
  for p in rows:
    allowed[:, p, :] = ~critical
  if base_mask_PxE is not None:
    base = np.asarray(base_mask_PxE, bool)
    if base.shape != (num_partitions, e):
      raise ValueError(
          f"base_mask_PxE has shape {base.shape}; expected "
          f"{(num_partitions, e)}."
      )
    allowed &= base[None]
  return allowed


def shared_layer_mask(allowed_MxPxE) -> np.ndarray:
  """bool [P, E]: one mask for all layers, allowing what every layer allows.

  An explicit alternative to the per-layer mask, for a caller that needs one
  `expert_mask_PxE` (e.g. to compare with per-layer masking). Layers are
  combined by intersection: expert e is removed in every layer if it is
  critical in any, which over-masks when layers disagree (expert e of layer 1
  and of layer 3 are unrelated networks).
  """
  allowed = np.asarray(allowed_MxPxE, bool)
  if allowed.ndim != 3:
    raise ValueError(
        f"allowed_MxPxE must be [M, P, E], got shape " f"{allowed.shape}."
    )
  shared = allowed.all(axis=0)
  empty = np.flatnonzero(~shared.any(axis=-1) & allowed.any(axis=(0, 2)))
  if empty.size:
    raise ValueError(
        f"Intersecting the layers' masks leaves partitions "
        f"{empty.tolist()} no expert; select fewer experts or "
        "mask per layer."
    )
  return shared


def decoder_mask_kwargs(allowed_MxPxE, per_layer: bool = True) -> dict:
  """Keyword arguments that apply a `router_mask` result to `TieredDecoder`.

  Args:
    allowed_MxPxE: bool [M, P, E] from `router_mask`.
    per_layer: True (the default) masks each MoE layer with its own row,
      `{'expert_mask_MxPxE': allowed}`; False applies `shared_layer_mask`
      in every layer, `{'expert_mask_PxE': ...}`.
  """
  allowed = np.asarray(allowed_MxPxE, bool)
  if not per_layer:
    return {"expert_mask_PxE": shared_layer_mask(allowed)}
  if allowed.ndim != 3:
    raise ValueError(
        f"allowed_MxPxE must be [M, P, E], got shape {allowed.shape}."
    )
  return {"expert_mask_MxPxE": allowed}
