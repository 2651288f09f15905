"""How languages use experts: usage matrices and compartmentalization.

The per-language evaluator accumulates how often each language sends a token
to each expert of each MoE layer (`eval.routing_counts.RoutingCounts`). The
metric functions here work on one layer's
language x expert matrix of counts (or routed mass) and ask how separable the
languages are in expert space, which decides how cheaply one language can be
removed by masking experts (the compartmentalization axis of the study):

  normalized entropy    H(e | l) / log E per language: 0 = one expert,
                        1 = all experts equally.
  top-m coverage        share of a language's routing in its m most used
                        experts: what masking m experts per layer removes.
  mutual information    I(L; E) in bits; with a uniform language prior it is
                        log2(#languages) when every language has experts of
                        its own (cf. the expert-specialization analyses of
                        ST-MoE, Zoph et al. 2022, Sec. 7, and the language
                        routing study of Kudugunta et al. 2021).
  Jensen-Shannon        JS(p(e|l), p(e|l')) in bits, in [0, 1].

Shape letters: N languages, M MoE layers, E experts, K slots per token.
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from tiered_routing.eval import routing_counts
from tiered_routing.tier1 import languages

LANGUAGE_PRIORS = ("empirical", "uniform")


def _as_counts(counts_NxE) -> np.ndarray:
  counts = np.asarray(counts_NxE, np.float64)
  if counts.ndim != 2:
    raise ValueError(
        f"counts must be [languages, experts], got shape {counts.shape}"
    )
  if (counts < 0).any():
    raise ValueError("counts must be >= 0")
  return counts


def expert_distribution(counts_NxE) -> np.ndarray:
  """p(e | l): rows normalized to 1; rows with no routing stay 0."""
  counts = _as_counts(counts_NxE)
  totals = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _entropy_bits(p, axis=-1) -> np.ndarray:
  plogp = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(axis=axis)


def entropy_bits(counts_NxE) -> np.ndarray:
  """H(p(e | l)) in bits per language, float64[N]; NaN for unrouted rows."""
  counts = _as_counts(counts_NxE)
  h = _entropy_bits(expert_distribution(counts))
  return np.where(counts.sum(axis=1) > 0, h, np.nan)


def normalized_entropy(counts_NxE) -> np.ndarray:
  """H(p(e | l)) / log E per language, float64[N]; NaN for unrouted rows."""
  counts = _as_counts(counts_NxE)
  num_experts = counts.shape[1]
  h = _entropy_bits(expert_distribution(counts))
  h = h / math.log2(num_experts) if num_experts > 1 else np.zeros_like(h)
  return np.where(counts.sum(axis=1) > 0, h, np.nan)


def top_m_coverage(counts_NxE, m: int) -> np.ndarray:
  """Share of each language's routing in its m most used experts, [N]."""
  counts = _as_counts(counts_NxE)
  if not isinstance(m, (int, np.integer)) or not 1 <= m <= counts.shape[1]:
    raise ValueError(f"m={m!r}; allowed: 1..{counts.shape[1]} (experts)")
  top = -np.sort(-expert_distribution(counts), axis=1)[:, :m].sum(axis=1)
  return np.where(counts.sum(axis=1) > 0, top, np.nan)


def joint_distribution(counts_NxE, language_prior="empirical") -> np.ndarray:
  """p(l, e). "empirical": counts / total; "uniform": p(l) = 1 / #languages
  routed at all, so that large languages do not dominate the statistics."""
  counts = _as_counts(counts_NxE)
  if language_prior == "empirical":
    total = counts.sum()
    return counts / total if total > 0 else counts
  if language_prior == "uniform":
    present = counts.sum(axis=1) > 0
    return expert_distribution(counts) / max(present.sum(), 1)
  raise ValueError(
      f"Unknown language_prior {language_prior!r}; allowed: "
      f"{LANGUAGE_PRIORS}"
  )


def mutual_information(counts_NxE, language_prior="empirical") -> float:
  """I(language; expert) in bits = H(E) - H(E | L)."""
  joint = joint_distribution(counts_NxE, language_prior)
  p_l, p_e = joint.sum(axis=1), joint.sum(axis=0)
  h_e_given_l = float(np.sum(p_l * _entropy_bits(expert_distribution(joint))))
  return max(float(_entropy_bits(p_e)) - h_e_given_l, 0.0)


def normalized_mutual_information(
    counts_NxE, language_prior="empirical"
) -> float:
  """I(L; E) / min(H(L), H(E)) in [0, 1]; 0 if either entropy is 0.

  1 means one variable determines the other; with more experts than
  languages that is "every expert serves a single language".
  """
  joint = joint_distribution(counts_NxE, language_prior)
  denom = min(
      float(_entropy_bits(joint.sum(axis=1))),
      float(_entropy_bits(joint.sum(axis=0))),
  )
  if denom <= 0:
    return 0.0
  return min(mutual_information(counts_NxE, language_prior) / denom, 1.0)


def js_divergence_matrix(counts_NxE) -> np.ndarray:
  """Pairwise Jensen-Shannon divergence of p(e | l) in bits, [N, N].

  Rows of languages with no routing are NaN.
  """
  counts = _as_counts(counts_NxE)
  p = expert_distribution(counts)
  mid = 0.5 * (p[:, None, :] + p[None, :, :])
  h = _entropy_bits(p)
  js = _entropy_bits(mid) - 0.5 * (h[:, None] + h[None, :])
  js = np.clip(js, 0.0, 1.0)
  absent = counts.sum(axis=1) == 0
  js[absent, :] = np.nan
  js[:, absent] = np.nan
  return js


@dataclasses.dataclass(frozen=True)
class Compartmentalization:
  """How concentrated one language is in few experts of one layer.

  Attributes:
    language: the language's code.
    top_experts: its m most used experts, most used first.
    top_m_coverage: share of its routing in `top_experts`.
    normalized_entropy: H(e | l) / log E.
    specificity_bits: KL(p(e | l) || p(e)), its term of I(L; E) (which is
      the prior-weighted mean of these terms).
    exclusivity: share of the routing into `top_experts` (all languages,
      under the language prior) that comes from this language.
    others_top_m_share: mean share of the other routed languages' routing
      that goes to `top_experts`: the collateral of masking them.
    nearest_language: the other language with the lowest JS divergence.
    nearest_js_bits: that divergence.
  """

  language: str
  top_experts: tuple[int, ...]
  top_m_coverage: float
  normalized_entropy: float
  specificity_bits: float
  exclusivity: float
  others_top_m_share: float
  nearest_language: str
  nearest_js_bits: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _language_index(language, num_rows: int, codes) -> int:
  if codes is None:
    codes = languages.CODES
  if len(codes) != num_rows:
    raise ValueError(f"{len(codes)} language codes for {num_rows} rows")
  if language not in codes:
    raise ValueError(f"Unknown language {language!r}; allowed: {codes}")
  return list(codes).index(language)


def compartmentalization(
    counts_NxE, language: str, m: int, language_prior="uniform", codes=None
) -> Compartmentalization:
  """Compartmentalization summary of `language` in one layer.

  Args:
    counts_NxE: routing counts (or mass) per language and expert.
    language: code of the language (e.g. the one to forget).
    m: number of top experts considered.
    language_prior: see `joint_distribution`.
    codes: row labels; default the 16 study languages in canonical order.
  """
  counts = _as_counts(counts_NxE)
  i = _language_index(language, counts.shape[0], codes)
  codes = tuple(codes or languages.CODES)
  if counts[i].sum() == 0:
    raise ValueError(f"language {language!r} has no routed tokens")
  coverage = top_m_coverage(counts, m)[i]
  p = expert_distribution(counts)
  top = tuple(int(e) for e in np.argsort(-p[i], kind="stable")[:m])
  joint = joint_distribution(counts, language_prior)
  p_e = joint.sum(axis=0)
  nz = p[i] > 0
  specificity = float(np.sum(p[i][nz] * np.log2(p[i][nz] / p_e[nz])))
  into_top = joint[:, top].sum()
  others = [j for j in range(len(codes)) if j != i and counts[j].sum() > 0]
  js = js_divergence_matrix(counts)[i]
  nearest = min(others, key=lambda j: js[j]) if others else None
  return Compartmentalization(
      language=language,
      top_experts=top,
      top_m_coverage=float(coverage),
      normalized_entropy=float(normalized_entropy(counts)[i]),
      specificity_bits=max(specificity, 0.0),
      exclusivity=float(joint[i, top].sum() / into_top),
      others_top_m_share=(
          float(np.mean(p[others][:, top].sum(axis=1))) if others else math.nan
      ),
      nearest_language=codes[nearest] if nearest is not None else "",
      nearest_js_bits=float(js[nearest]) if nearest is not None else math.nan,
  )


def summary(
    counts: routing_counts.RoutingCounts,
    m: int,
    weighted: bool = False,
    language_prior: str = "uniform",
) -> dict[str, np.ndarray]:
  """Per-layer metrics of routing counts: entropy_MxN, coverage_MxN,
  mi_bits_M, nmi_M (M MoE layers, N languages)."""
  mats = [counts.usage(y, weighted) for y in range(counts.shape[1])]
  return {
      "normalized_entropy_MxN": np.stack([normalized_entropy(c) for c in mats]),
      "top_m_coverage_MxN": np.stack([top_m_coverage(c, m) for c in mats]),
      "mutual_information_bits_M": np.array(
          [mutual_information(c, language_prior) for c in mats]
      ),
      "normalized_mutual_information_M": np.array(
          [normalized_mutual_information(c, language_prior) for c in mats]
      ),
  }


def compartmentalization_columns(
    counts: routing_counts.RoutingCounts,
    code: str,
    m: int,
    reachable: Optional[Sequence[int]] = None,
) -> dict[str, float]:
  """How concentrated a language is in experts, averaged over MoE layers.

  Args:
    counts: routing counts with global expert ids (the evaluator's).
    code: the language (e.g. the one to forget).
    m: experts counted by the top-m mass.
    reachable: global ids of the experts the language can be routed to
      (its partition's under strict partitions or shared attention);
      None = all. Its entropy is normalized by log of their number: a
      language spread evenly over the 4 experts of its partition has
      entropy 1, not log 4 / log 16.

  Returns:
    comp_top_m (m), comp_top_m_mass (share of its routing in its m most used
    experts), comp_entropy (normalized entropy over the reachable experts),
    comp_specificity_bits (its KL term of I(L; E)) and comp_mi_bits (I(L; E)
    over all languages, uniform language prior).
  """
  layers = range(counts.shape[1])
  per_layer = [compartmentalization(counts.usage(y), code, m) for y in layers]
  mi = [mutual_information(counts.usage(y), "uniform") for y in layers]
  mean = lambda name: float(np.mean([getattr(c, name) for c in per_layer]))
  row = languages.language_id(code)
  cols = slice(None) if reachable is None else list(reachable)
  entropy = [
      normalized_entropy(counts.usage(y)[row : row + 1, cols])[0]
      for y in layers
  ]
  return {
      "comp_top_m": m,
      "comp_top_m_mass": mean("top_m_coverage"),
      "comp_entropy": float(np.mean(entropy)),
      "comp_specificity_bits": mean("specificity_bits"),
      "comp_mi_bits": float(np.mean(mi)),
  }
