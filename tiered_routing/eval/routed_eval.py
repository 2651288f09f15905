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
the routing accuracy against the oracle, the utility cost (mode - oracle)
of loss and bits per byte, and where its rows went (`routed_to_p<q>`, the
share of rows per partition; the ensemble's is its heaviest partition).

Opt-out (`RoutingConfig.disabled_partitions`, `tier1.opt_out`): switched-off
partitions are never chosen; the oracle scores the rows of their languages
as uniform ('unroutable' share), the classifier and the ensemble route
among the partitions left.
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
from tiered_routing.tier1 import opt_out
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
    disabled_partitions: partitions switched off at inference (opt-out).
  """

  modes: Sequence[str] | str = MODES
  weighting: str = "posterior"
  top_k: Optional[int] = None
  temperature: float = 0.1
  classifier_docs: int = 1000
  disabled_partitions: Sequence[int] = ()

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
    disabled = tuple(self.disabled_partitions)
    bad = [p for p in disabled if isinstance(p, bool)
           or not isinstance(p, (int, np.integer)) or p < 0]
    if bad:
      raise ValueError(f"disabled_partitions={list(disabled)}: {bad[0]!r} is "
                       "not a partition index; allowed: ints >= 0.")
    object.__setattr__(self, "disabled_partitions",
                       tuple(sorted(set(int(p) for p in disabled))))

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
    partition: int [B], the partition the row went to (the ensemble: its
      heaviest over the row's tokens); -1 = unroutable (oracle, opted out).
  """

  log_likelihood: np.ndarray
  hits: np.ndarray
  decisions: np.ndarray
  oracle_weight: np.ndarray
  partition: np.ndarray


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
    self.enabled = opt_out.enabled_mask(
        scheme.num_partitions, config.disabled_partitions
    )

  def posterior(self, texts: Sequence[str]) -> np.ndarray:
    """P(partition | text) over the enabled partitions, [B, P]; uniform
    for empty (padding) rows."""
    p = self.scheme.num_partitions
    out = np.full((len(texts), p), 1.0 / p)
    real = [i for i, t in enumerate(texts) if t]
    if real and self.classifier is not None:
      out[real] = self.classifier.partition_posterior(
          [texts[i] for i in real], self.scheme, self.config.temperature
      )
    return opt_out.restrict_posterior(out, self.enabled)

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
    posterior = self.posterior(texts)
    out = {}
    for mode in self.config.modes:
      if mode == "ensemble":
        out[mode] = self._ensemble(lp_PxBxL, mask_BxL, oracle_B, posterior)
      else:
        out[mode] = self._single(mode, batch, lp_PxBxL, mask_BxL, oracle_B,
                                 posterior)
    return texts, out

  def _single(self, mode, batch, lp_PxBxL, mask_BxL, oracle_B, posterior):
    """The oracle or the classifier: one partition per row; a row whose
    oracle partition is off is unroutable and scored as uniform."""
    part_B = np.asarray(
        ir.routed_partition(
            mode,
            language_ids=batch["decoder_language_ids"][:, 0],
            scheme=self.scheme,
            posterior=posterior,
        )
    )
    ll = np.asarray(ir.sequence_log_likelihood(
        ir.select_partition(lp_PxBxL, part_B), mask_BxL
    ), np.float64)
    off_B = ~self.enabled[part_B]
    uniform = -np.log(self.scorer.vocab_size) * mask_BxL.sum(axis=1)
    ll = np.where(off_B, uniform, ll)
    real_B = (mask_BxL.sum(axis=1) > 0).astype(np.float64)
    hit_B = (part_B == oracle_B) * real_B * ~off_B
    return RowScores(ll, hit_B, real_B, hit_B, np.where(off_B, -1, part_B))

  def _ensemble(self, lp_PxBxL, mask_BxL, oracle_B, posterior):
    cfg = self.config
    prior = None  # The prefix weighting's prior: uniform over what is on.
    if cfg.weighting == "prefix" and cfg.disabled_partitions:
      prior = np.broadcast_to(self.enabled / self.enabled.sum(),
                              posterior.shape)
    log_w_BxLxP = ir.ensemble_log_weights(
        lp_PxBxL,
        weighting=cfg.weighting,
        posterior=posterior if cfg.weighting == "posterior" else prior,
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
    heaviest_B = np.argmax(
        (np.exp(log_w) * mask_BxL[..., None]).sum(axis=1), axis=-1
    )
    return RowScores(
        ir.sequence_log_likelihood(token_ll, mask_BxL),
        (hit_BxL * mask_BxL).sum(axis=1),
        mask_BxL.sum(axis=1).astype(np.float64),
        (w_oracle_BxL * mask_BxL).sum(axis=1),
        heaviest_B,
    )


class RoutingAccumulator:
  """Per mode and language: loss sums and routing decisions."""

  def __init__(self, config: RoutingConfig):
    self.config = config
    modes = config.modes
    self._loss = {m: lm_metrics.LanguageLossAccumulator() for m in modes}
    # (hits, decisions, oracle weight) per mode and language id.
    self._routing = {m: np.zeros((languages.NUM_LANGUAGES, 3)) for m in modes}
    # Rows per mode, language id and partition (index -1: unroutable).
    self._routed = {m: {} for m in modes}

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
        key = (lang, int(s.partition[row]))
        self._routed[mode][key] = self._routed[mode].get(key, 0) + 1

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
      res.update(self._routed_shares(mode))
      total = counts.sum(axis=0)
      if total[1]:
        res["all/routing_accuracy"] = total[0] / total[1]
        res["all/oracle_weight"] = total[2] / total[1]
      label = self.config.label(mode)
      out.update({f"{PREFIX}/{label}/{k}": float(v) for k, v in res.items()})
    return with_costs(out, self.config.labels)


  def _routed_shares(self, mode: str) -> dict[str, float]:
    """'{code}/routed_to_p{q}' and '{code}/unroutable': shares of rows."""
    rows = {}
    for (lang, _), n in self._routed[mode].items():
      rows[lang] = rows.get(lang, 0) + n
    out = {}
    for (lang, part), n in sorted(self._routed[mode].items()):
      where = "unroutable" if part < 0 else f"routed_to_p{part}"
      out[f"{languages.CODES[lang]}/{where}"] = n / rows[lang]
    return out


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
