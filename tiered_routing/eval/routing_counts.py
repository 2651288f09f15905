"""Expert assignments per (language, MoE layer, expert), summed over batches.

`RoutingCounts` accumulates, over an evaluation set, how often each language
sends a token to each expert of each MoE layer, from the routers' outputs
(`RouterOutput.expert_index_TxK` / `combine_weights_TxK`, a per-token
language id and a validity mask). The per-language evaluator fills it; the
statistics read off it (entropy, top-m coverage, mutual information,
Jensen-Shannon divergence) are `analysis.routing_stats`'.

Shape letters: N languages, M MoE layers, E experts, K slots per token.
"""

from etils import epath
import numpy as np

from tiered_routing.tier1 import languages


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

  Two matrices are kept: `assignments_NxMxE` counts routed slots (a token
  sent to k experts counts once for each) and `mass_NxMxE` sums their
  combine weights (each token contributes its total gate weight, 1 for
  renormalized top-k). `tokens_NxM` counts valid tokens.
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
    self.assignments_NxMxE = np.zeros(shape, np.float64)
    self.mass_NxMxE = np.zeros(shape, np.float64)
    self.tokens_NxM = np.zeros(shape[:2], np.float64)

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.assignments_NxMxE.shape

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
      layer: MoE layer index, 0..M-1.
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
    self.assignments_NxMxE[:, layer] += np.bincount(
        flat, minlength=size
    ).reshape(num_lang, num_experts)
    self.mass_NxMxE[:, layer] += np.bincount(
        flat, weights=w[routed], minlength=size
    ).reshape(num_lang, num_experts)
    self.tokens_NxM[:, layer] += np.bincount(lang[valid], minlength=num_lang)

  def merge(self, other: "RoutingCounts") -> None:
    if other.shape != self.shape:
      raise ValueError(
          f"cannot merge counts of shape {other.shape} into {self.shape}"
      )
    self.assignments_NxMxE += other.assignments_NxMxE
    self.mass_NxMxE += other.mass_NxMxE
    self.tokens_NxM += other.tokens_NxM

  def usage(self, layer: int, weighted: bool = False) -> np.ndarray:
    """Language x expert matrix of one layer: slot counts or gate mass."""
    if not 0 <= layer < self.shape[1]:
      raise ValueError(f"layer={layer!r}; allowed: 0..{self.shape[1] - 1}")
    source = self.mass_NxMxE if weighted else self.assignments_NxMxE
    return source[:, layer].copy()

  def save(self, path) -> None:
    with epath.Path(path).open("wb") as f:
      np.savez(
          f,
          assignments_NxMxE=self.assignments_NxMxE,
          mass_NxMxE=self.mass_NxMxE,
          tokens_NxM=self.tokens_NxM,
      )

  @classmethod
  def load(cls, path) -> "RoutingCounts":
    with epath.Path(path).open("rb") as f:
      arrays = dict(np.load(f, allow_pickle=False))
    num_lang, num_layers, num_experts = arrays["assignments_NxMxE"].shape
    out = cls(num_layers, num_experts, num_lang)
    out.assignments_NxMxE = arrays["assignments_NxMxE"]
    out.mass_NxMxE = arrays["mass_NxMxE"]
    out.tokens_NxM = arrays["tokens_NxM"]
    return out
