"""Membership inference against unlearned models, and MUSE's PrivLeak.

A forgotten language's training paragraphs should look to the unlearned
model like paragraphs it never saw. Each paragraph gets a membership score
(higher = "was trained on"); the AUC of the scores of training paragraphs
(members) against held-out paragraphs of the same language (non-members)
measures how much the model still tells them apart. A model that never
saw the language (the retrained reference) has an AUC near 0.5, up to the
distribution shift between the two sets; MUSE's PrivLeak (Shi et al. 2024,
arXiv 2407.06460) measures the unlearned model against it:

  PrivLeak = (AUC_unlearned - AUC_reference) / AUC_reference,

0 for a perfect unlearning, > 0 when members still stand out (under-
unlearning), < 0 when they stand out the other way (over-unlearning: the
forget set now looks *less* likely than unseen text).

Scores (all oriented so that higher means member):
  loss    minus the mean token NLL (Yeom et al. 2018).
  zlib    minus the mean NLL over the zlib-compressed length of the
          paragraph's text in bytes (Carlini et al. 2021): discounts
          paragraphs that are easy for any compressor.
  minkpp  Min-K%++ (Zhang et al. 2024, arXiv 2404.02936): per token,
          (log p(x_t) - mu_t) / sigma_t with mu_t, sigma_t the mean and
          standard deviation of log p(z) under the model's own next-token
          distribution p(z); the paragraph's score is the mean of its
          lowest k% tokens. The score MUSE reports PrivLeak on.
"""

import dataclasses
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCORES = ("loss", "zlib", "minkpp")


def token_statistics(logits_xV, targets_x):
  """Per-token log p(target) and its Min-K%++ standardization.

  Args:
    logits_xV: float logits [..., V].
    targets_x: int targets [...].

  Returns:
    (logp_x, minkpp_x): float32; minkpp is 0 where the distribution has no
    spread (sigma = 0, e.g. uniform), which carries no membership signal.
  """
  logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
  logp_x = jnp.take_along_axis(logp_xV, targets_x[..., None], axis=-1)[..., 0]
  p_xV = jnp.exp(logp_xV)
  mu_x = jnp.sum(p_xV * logp_xV, axis=-1)
  var_x = jnp.sum(p_xV * jnp.square(logp_xV), axis=-1) - jnp.square(mu_x)
  sigma_x = jnp.sqrt(jnp.maximum(var_x, 0.0))
  minkpp_x = jnp.where(
      sigma_x > 1e-6, (logp_x - mu_x) / jnp.maximum(sigma_x, 1e-6), 0.0
  )
  return logp_x, minkpp_x


def min_k_mean(values: np.ndarray, k: float) -> float:
  """Mean of the lowest ceil(k * n) of `values` (n >= 1)."""
  values = np.sort(np.asarray(values, np.float64))
  count = max(1, int(np.ceil(k * len(values))))
  return float(values[:count].mean())


@dataclasses.dataclass(frozen=True)
class ParagraphScores:
  """Membership scores of N paragraphs, each float64 [N], higher = member."""

  loss: np.ndarray
  zlib: np.ndarray
  minkpp: np.ndarray

  def get(self, name: str) -> np.ndarray:
    if name not in SCORES:
      raise ValueError(f"score {name!r}; allowed: {SCORES}.")
    return getattr(self, name)


def paragraph_scores(
    logp_NxL: np.ndarray,
    minkpp_NxL: np.ndarray,
    weights_NxL: np.ndarray,
    texts: Sequence[bytes],
    k: float = 0.2,
) -> ParagraphScores:
  """Scores of N paragraphs from their per-token statistics.

  Args:
    logp_NxL: log p of each target token.
    minkpp_NxL: each token's Min-K%++ value.
    weights_NxL: 1 where a token belongs to the paragraph (every row needs
      at least one).
    texts: each paragraph's UTF-8 text (for its zlib length).
    k: the fraction of lowest tokens Min-K%++ averages.
  """
  if not 0 < k <= 1:
    raise ValueError(f"k={k!r}; allowed: 0 < k <= 1.")
  weights = np.asarray(weights_NxL) > 0
  if len(texts) != len(weights) or not weights.any(axis=1).all():
    raise ValueError(
        f"{len(texts)} texts for {len(weights)} rows, and every row needs "
        "a scored token."
    )
  logp, minkpp = np.asarray(logp_NxL), np.asarray(minkpp_NxL)
  nll = np.array(
      [-logp[i][weights[i]].mean() for i in range(len(weights))], np.float64
  )
  zlen = np.array([max(1, len(zlib.compress(t))) for t in texts], np.float64)
  mink = np.array(
      [min_k_mean(minkpp[i][weights[i]], k) for i in range(len(weights))]
  )
  return ParagraphScores(loss=-nll, zlib=-nll / zlen, minkpp=mink)


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
  """ROC AUC of telling members (positives) from non-members by score.

  The Mann-Whitney statistic: the probability that a random member scores
  above a random non-member, ties counting one half.
  """
  pos = np.asarray(members, np.float64)
  neg = np.asarray(non_members, np.float64)
  if not len(pos) or not len(neg):
    raise ValueError(
        f"AUC needs both classes; got {len(pos)} members and {len(neg)} "
        "non-members."
    )
  both = np.concatenate([pos, neg])
  order = both.argsort(kind="mergesort")
  ranks = np.empty(len(both), np.float64)
  sorted_scores = both[order]
  # Average ranks over ties.
  _, first, counts = np.unique(
      sorted_scores, return_index=True, return_counts=True
  )
  average = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(average, counts)
  u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
  return float(u / (len(pos) * len(neg)))


def privleak(auc_unlearned: float, auc_reference: float) -> float:
  """MUSE's PrivLeak: (AUC_unlearned - AUC_reference) / AUC_reference."""
  if not auc_reference > 0:
    raise ValueError(f"auc_reference={auc_reference!r}; must be > 0.")
  return (auc_unlearned - auc_reference) / auc_reference


def auc_columns(
    members: ParagraphScores, non_members: ParagraphScores, prefix: str
) -> dict[str, float]:
  """{f'{prefix}_auc_{score}': AUC} for every score."""
  return {
      f"{prefix}_auc_{name}": auc(members.get(name), non_members.get(name))
      for name in SCORES
  }
