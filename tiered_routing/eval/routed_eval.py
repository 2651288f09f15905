"""Evaluation under tier-1 inference routing: oracle, classifier, ensemble.

`inference_routing` holds the routing math; this module runs it over whole
evaluation splits of a `TieredDecoder`. Every partition scores every
sequence (`scoring.PartitionScorer` gives log p_p(x_t | x_<t) for every
partition p), so every mode is scored from one forward pass:

  oracle      the partition of the language label (training-time route).
  classifier  the argmax partition of the tf-idf classifier's posterior
              (`classifier.LanguageClassifier`, c-BTM routing), computed on
              the decoded text of the whole scored sequence.
  ensemble    the mixture of the partitions' next-token distributions,
              weighted by that posterior ('posterior', c-BTM) or by the
              prefix likelihood under a uniform prior ('prefix', BTM),
              optionally sparse (top-k partitions).

Rows are unpacked (one sequence per row) so a row has one posterior.
Per language it reports loss, perplexity and bits per byte of each mode,
the routing accuracy against the oracle, and the utility cost
(mode - oracle) of loss and bits per byte.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from tiered_routing.data import feature_rows
from tiered_routing.eval import lm_metrics
from tiered_routing.eval import scoring
from tiered_routing.tier1 import inference_routing as ir
from tiered_routing.tier1 import language_classifier
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

MODES = ir.MODES
WEIGHTINGS = ir.WEIGHTINGS
PREFIX = "routing"
# Metrics of a mode, per language and pooled, in the printed table.
TABLE_METRICS = (
    "loss",
    "bits_per_byte",
    "routing_accuracy",
    "loss_cost",
    "bits_per_byte_cost",
)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
  """Which tier-1 inference modes to evaluate, and how.

  Attributes:
    modes: one mode or several, each one of MODES; 'oracle' is always
      evaluated too (it is the reference of the utility cost).
    weighting: ensemble weights, 'posterior' (classifier posterior, c-BTM)
      or 'prefix' (prefix likelihood, uniform prior, BTM).
    top_k: ensemble: partitions kept per position (None = all).
    temperature: classifier posterior softmax(-||x - c||^2 / T).
    classifier_docs: training documents per language the classifier is fit
      on (the first ones of the train split).
  """

  modes: Sequence[str] | str = MODES
  weighting: str = "posterior"
  top_k: Optional[int] = None
  temperature: float = 0.1
  classifier_docs: int = 1000

  def __post_init__(self):
    modes = (self.modes,) if isinstance(self.modes, str) else self.modes
    for mode in modes:
      if mode not in MODES:
        raise ValueError(
            f"Unknown inference routing mode {mode!r}; allowed: {MODES}"
        )
    ordered = tuple(m for m in MODES if m == "oracle" or m in modes)
    object.__setattr__(self, "modes", ordered)
    if self.weighting not in WEIGHTINGS:
      raise ValueError(
          f"Unknown ensemble weighting {self.weighting!r}; allowed: "
          f"{WEIGHTINGS}"
      )
    top_k = self.top_k
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
    ):
      raise ValueError(f"top_k={top_k!r}; allowed: None or an int >= 1")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature!r}; allowed: > 0")
    if self.classifier_docs < 1:
      raise ValueError(
          f"classifier_docs={self.classifier_docs!r}; allowed: >= 1"
      )

  def label(self, mode: str) -> str:
    """A mode's name in the results; an ensemble's names its settings."""
    if mode != "ensemble":
      return mode
    top = "" if self.top_k is None else f"_top{self.top_k}"
    return f"ensemble_{self.weighting}{top}"

  @property
  def labels(self) -> tuple[str, ...]:
    return tuple(self.label(m) for m in self.modes)

  @property
  def needs_classifier(self) -> bool:
    return "classifier" in self.modes or (
        "ensemble" in self.modes and self.weighting == "posterior"
    )


class RowScores(NamedTuple):
  """Per-row results of one mode, float64 [B] each.

  Attributes:
    log_likelihood: summed log-likelihood of the row's scored tokens.
    hits: routing decisions that chose the oracle partition (classifier: 1
      per row; ensemble: per token, the highest-weight partition, ties
      shared).
    decisions: routing decisions made (rows, or scored tokens).
    oracle_weight: summed mixture weight on the oracle partition.
  """

  log_likelihood: np.ndarray
  hits: np.ndarray
  decisions: np.ndarray
  oracle_weight: np.ndarray


class RoutedScorer:
  """Scores unpacked [rows, L] batches under every mode of a RoutingConfig."""

  def __init__(
      self,
      scorer: scoring.PartitionScorer,
      scheme: schemes.PartitionScheme,
      vocabulary,
      config: RoutingConfig,
      classifier: Optional[language_classifier.LanguageClassifier] = None,
  ):
    if scheme.num_partitions != scorer.num_partitions:
      raise ValueError(
          f"scheme has {scheme.num_partitions} partitions, the model "
          f"{scorer.num_partitions}"
      )
    if config.needs_classifier and classifier is None:
      raise ValueError(f"modes {config.modes} need a fitted classifier")
    if config.top_k is not None and config.top_k > scheme.num_partitions:
      raise ValueError(
          f"top_k={config.top_k}; allowed: at most num_partitions="
          f"{scheme.num_partitions}"
      )
    self.scorer, self.scheme, self.config = scorer, scheme, config
    self.vocabulary, self.classifier = vocabulary, classifier

  def posterior(self, texts: Sequence[str]) -> np.ndarray:
    """P(partition | text), [B, P]; uniform for empty (padding) rows."""
    p = self.scheme.num_partitions
    out = np.full((len(texts), p), 1.0 / p)
    real = [i for i, t in enumerate(texts) if t]
    if real and self.classifier is not None:
      out[real] = self.classifier.partition_posterior(
          [texts[i] for i in real], self.scheme, self.config.temperature
      )
    return out

  def __call__(
      self, batch: Mapping[str, np.ndarray]
  ) -> tuple[list[str], dict[str, RowScores]]:
    """Decoded texts and each mode's RowScores of a [rows, L] batch."""
    batch = feature_rows.pad_rows(batch, self.scorer.rows)
    texts = scoring.row_texts(batch, self.vocabulary)
    lp_PxBxL = jnp.asarray(self.scorer(batch))
    mask_BxL = batch["decoder_loss_weights"].astype(np.float32)
    oracle_B = np.asarray(
        ir.oracle_partitions(batch["decoder_language_ids"][:, 0], self.scheme)
    )
    posterior = self.posterior(texts) if self.config.needs_classifier else None
    out = {}
    for mode in self.config.modes:
      if mode == "ensemble":
        out[mode] = self._ensemble(lp_PxBxL, mask_BxL, oracle_B, posterior)
      else:
        part_B = np.asarray(
            ir.routed_partition(
                mode,
                language_ids=batch["decoder_language_ids"][:, 0],
                scheme=self.scheme,
                posterior=posterior,
            )
        )
        ll = ir.sequence_log_likelihood(
            ir.select_partition(lp_PxBxL, part_B), mask_BxL
        )
        real_B = (mask_BxL.sum(axis=1) > 0).astype(np.float64)
        hit_B = (part_B == oracle_B) * real_B
        out[mode] = RowScores(ll, hit_B, real_B, hit_B)
    return texts, out

  def _ensemble(self, lp_PxBxL, mask_BxL, oracle_B, posterior):
    cfg = self.config
    log_w_BxLxP = ir.ensemble_log_weights(
        lp_PxBxL,
        weighting=cfg.weighting,
        posterior=posterior if cfg.weighting == "posterior" else None,
        top_k=cfg.top_k,
        mask_BxL=mask_BxL,
    )
    token_ll = ir.mixture_token_log_likelihood(lp_PxBxL, log_w_BxLxP)
    log_w = np.asarray(log_w_BxLxP)
    # A tie (e.g. the uniform prefix weights at a sequence's first token)
    # counts as 1 / (number of tied partitions) of a hit, not as a hit for
    # the lowest partition id.
    top_BxLxP = log_w == log_w.max(axis=-1, keepdims=True)
    hit_BxL = np.take_along_axis(top_BxLxP, oracle_B[:, None, None], axis=-1)[
        ..., 0
    ] / top_BxLxP.sum(axis=-1)
    w_oracle_BxL = np.exp(
        np.take_along_axis(log_w, oracle_B[:, None, None], axis=-1)[..., 0]
    )
    return RowScores(
        ir.sequence_log_likelihood(token_ll, mask_BxL),
        (hit_BxL * mask_BxL).sum(axis=1),
        mask_BxL.sum(axis=1).astype(np.float64),
        (w_oracle_BxL * mask_BxL).sum(axis=1),
    )


class RoutingAccumulator:
  """Per mode and language: loss sums and routing decisions."""

  def __init__(self, config: RoutingConfig):
    self.config = config
    modes = config.modes
    self._loss = {m: lm_metrics.LanguageLossAccumulator() for m in modes}
    # (hits, decisions, oracle weight) per mode and language id.
    self._routing = {m: np.zeros((languages.NUM_LANGUAGES, 3)) for m in modes}

  def add(self, batch, texts, scores: Mapping[str, RowScores]) -> None:
    """Adds the scored rows of one batch (padding rows are skipped)."""
    weights = np.asarray(batch["decoder_loss_weights"])
    for row, text in enumerate(texts):
      num_tokens = float(weights[row].sum())
      if not num_tokens:
        continue
      lang = int(batch["decoder_language_ids"][row, 0])
      num_bytes = lm_metrics.num_utf8_bytes(text)
      for mode in self.config.modes:
        s = scores[mode]
        self._loss[mode].add(
            languages.CODES[lang],
            -s.log_likelihood[row],
            num_tokens,
            num_bytes,
        )
        self._routing[mode][lang] += (
            s.hits[row],
            s.decisions[row],
            s.oracle_weight[row],
        )

  def results(self) -> dict[str, float]:
    """Flat '{PREFIX}/{mode}/{code|all|macro}/{metric}' metrics."""
    out = {}
    for mode in self.config.modes:
      res = self._loss[mode].results()
      counts = self._routing[mode]
      for lang in np.flatnonzero(counts[:, 1]):
        code = languages.CODES[lang]
        res[f"{code}/routing_accuracy"] = counts[lang, 0] / counts[lang, 1]
        res[f"{code}/oracle_weight"] = counts[lang, 2] / counts[lang, 1]
      total = counts.sum(axis=0)
      if total[1]:
        res["all/routing_accuracy"] = total[0] / total[1]
        res["all/oracle_weight"] = total[2] / total[1]
      label = self.config.label(mode)
      out.update({f"{PREFIX}/{label}/{k}": float(v) for k, v in res.items()})
    return with_costs(out, self.config.labels)


def with_costs(results: Mapping[str, float], labels) -> dict[str, float]:
  """Adds '{metric}_cost' = mode - oracle for loss and bits per byte."""
  out = dict(results)
  oracle = f"{PREFIX}/oracle/"
  for label in labels:
    base = f"{PREFIX}/{label}/"
    for key, value in results.items():
      metric = key.rsplit("/", 1)[-1]
      if not key.startswith(base) or metric not in ("loss", "bits_per_byte"):
        continue
      ref = oracle + key[len(base) :]
      if ref in results:
        out[f"{key}_cost"] = value - results[ref]
  return out


def evaluate(
    routed: RoutedScorer, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
  """Scores unpacked batches under every mode; flat results with costs."""
  acc = RoutingAccumulator(routed.config)
  for batch in batches:
    texts, scores = routed(batch)
    acc.add(feature_rows.pad_rows(batch, routed.scorer.rows), texts, scores)
  return acc.results()


def format_table(results: Mapping[str, float], labels: Sequence[str]) -> str:
  """One block per mode label: TABLE_METRICS of every language, pooled
  ('all') and language mean ('macro'); blank where undefined."""
  width = max(len(m) for m in TABLE_METRICS) + 2
  lines = []
  for label in labels:
    base = f"{PREFIX}/{label}/"
    lines.append(f"== {label}")
    lines.append("lang " + "".join(f"{m:>{width}}" for m in TABLE_METRICS))
    for code in (*languages.CODES, "all", "macro"):
      if f"{base}{code}/loss" not in results:
        continue
      cells = [results.get(f"{base}{code}/{m}") for m in TABLE_METRICS]
      lines.append(
          f"{code:<5}"
          + "".join(
              " " * width if v is None else f"{v:>{width}.4f}" for v in cells
          )
      )
  return "\n".join(lines)
