"""How languages use experts: usage matrices and compartmentalization.

`RoutingCounts` accumulates, over an evaluation set, how often each language
sends a token to each expert of each MoE layer, from the routers' outputs
(`RouterOutput.expert_index_TxK` / `combine_weights_TxK`, a per-token language
id and a validity mask). The metric functions work on one layer's
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

Shape letters: N languages, L layers, E experts, K slots per token.
"""

import dataclasses
import math

from etils import epath
import numpy as np

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


def _check_batch(
    expert_index_xK,
    combine_weights_xK,
    language_ids_x,
    mask_x,
    num_lang,
    num_experts,
):
  """Arrays of one routed batch, validated; returns (idx, w, lang, valid)."""
  idx = np.asarray(expert_index_xK)
  w = np.asarray(combine_weights_xK, np.float64)
  lang = np.asarray(language_ids_x)
  if idx.shape != w.shape or idx.shape[:-1] != lang.shape:
    raise ValueError(
        f"expert_index {idx.shape}, combine_weights {w.shape} and "
        f"language_ids {lang.shape} must be [..., K], [..., K] and [...]"
    )
  valid = (
      np.ones(lang.shape, bool)
      if mask_x is None
      else np.asarray(mask_x).astype(bool)
  )
  if valid.shape != lang.shape:
    raise ValueError(
        f"mask shape {valid.shape} != language_ids shape {lang.shape}"
    )
  bad = lang[valid & ((lang < 0) | (lang >= num_lang))]
  if bad.size:
    raise ValueError(
        f"language id {int(bad[0])} out of range; allowed: "
        f"0..{num_lang - 1}"
    )
  routed = valid[..., None] & (w != 0)
  bad = idx[routed & ((idx < 0) | (idx >= num_experts))]
  if bad.size:
    raise ValueError(
        f"expert index {int(bad[0])} out of range; allowed: "
        f"0..{num_experts - 1}"
    )
  return idx, w, lang, valid


class RoutingCounts:
  """Expert assignments per (language, layer, expert), summed over batches.

  Two matrices are kept: `assignments_NxLxE` counts routed slots (a token
  sent to k experts counts once for each) and `mass_NxLxE` sums their
  combine weights (each token contributes its total gate weight, 1 for
  renormalized top-k). `tokens_NxL` counts valid tokens.
  """

  def __init__(
      self,
      num_layers: int,
      num_experts: int,
      num_languages: int = languages.NUM_LANGUAGES,
  ):
    for name, v in (
        ("num_layers", num_layers),
        ("num_experts", num_experts),
        ("num_languages", num_languages),
    ):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    shape = (num_languages, num_layers, num_experts)
    self.assignments_NxLxE = np.zeros(shape, np.float64)
    self.mass_NxLxE = np.zeros(shape, np.float64)
    self.tokens_NxL = np.zeros(shape[:2], np.float64)

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.assignments_NxLxE.shape

  def add(
      self,
      layer: int,
      expert_index_xK,
      combine_weights_xK,
      language_ids_x,
      mask_x=None,
  ) -> None:
    """Adds one layer's routing of a batch.

    Args:
      layer: MoE layer index, 0..L-1.
      expert_index_xK: int [..., K] experts chosen per token (any leading
        shape, e.g. [G, S, K] straight from a vmapped router).
      combine_weights_xK: [..., K]; slots with weight 0 are not routed.
      language_ids_x: int [...] language id of every token.
      mask_x: optional [...] validity (0 = padding); ids of masked tokens are
        ignored.
    """
    num_lang, num_layers, num_experts = self.shape
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer={layer!r}; allowed: 0..{num_layers - 1}")
    idx, w, lang, valid = _check_batch(
        expert_index_xK,
        combine_weights_xK,
        language_ids_x,
        mask_x,
        num_lang,
        num_experts,
    )
    routed = valid[..., None] & (w != 0)
    lang_xK = np.broadcast_to(lang[..., None], idx.shape)
    flat = (lang_xK * num_experts + idx)[routed]
    size = num_lang * num_experts
    self.assignments_NxLxE[:, layer] += np.bincount(
        flat, minlength=size
    ).reshape(num_lang, num_experts)
    self.mass_NxLxE[:, layer] += np.bincount(
        flat, weights=w[routed], minlength=size
    ).reshape(num_lang, num_experts)
    self.tokens_NxL[:, layer] += np.bincount(lang[valid], minlength=num_lang)

  def merge(self, other: "RoutingCounts") -> None:
    if other.shape != self.shape:
      raise ValueError(
          f"cannot merge counts of shape {other.shape} into {self.shape}"
      )
    self.assignments_NxLxE += other.assignments_NxLxE
    self.mass_NxLxE += other.mass_NxLxE
    self.tokens_NxL += other.tokens_NxL

  def usage(self, layer: int, weighted: bool = False) -> np.ndarray:
    """Language x expert matrix of one layer: slot counts or gate mass."""
    if not 0 <= layer < self.shape[1]:
      raise ValueError(f"layer={layer!r}; allowed: 0..{self.shape[1] - 1}")
    source = self.mass_NxLxE if weighted else self.assignments_NxLxE
    return source[:, layer].copy()

  def summary(
      self, m: int, weighted: bool = False, language_prior: str = "uniform"
  ) -> dict[str, np.ndarray]:
    """Per-layer metrics: entropy_LxN, coverage_LxN, mi_bits_L, nmi_L."""
    mats = [self.usage(y, weighted) for y in range(self.shape[1])]
    return {
        "normalized_entropy_LxN": np.stack(
            [normalized_entropy(c) for c in mats]
        ),
        "top_m_coverage_LxN": np.stack([top_m_coverage(c, m) for c in mats]),
        "mutual_information_bits_L": np.array(
            [mutual_information(c, language_prior) for c in mats]
        ),
        "normalized_mutual_information_L": np.array(
            [normalized_mutual_information(c, language_prior) for c in mats]
        ),
    }

  def save(self, path) -> None:
    with epath.Path(path).open("wb") as f:
      np.savez(
          f,
          assignments_NxLxE=self.assignments_NxLxE,
          mass_NxLxE=self.mass_NxLxE,
          tokens_NxL=self.tokens_NxL,
      )

  @classmethod
  def load(cls, path) -> "RoutingCounts":
    with epath.Path(path).open("rb") as f:
      arrays = dict(np.load(f, allow_pickle=False))
    num_lang, num_layers, num_experts = arrays["assignments_NxLxE"].shape
    out = cls(num_layers, num_experts, num_lang)
    out.assignments_NxLxE = arrays["assignments_NxLxE"]
    out.mass_NxLxE = arrays["mass_NxLxE"]
    out.tokens_NxL = arrays["tokens_NxL"]
    return out
