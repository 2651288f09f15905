"""Language-modelling metrics: token loss, perplexity and bits per byte.

All metrics are computed from sums, never from averages of averages, so that
results do not depend on how the evaluation set was batched or packed:

  token loss     = sum of token NLL (nats) / number of scored tokens
  perplexity     = exp(token loss)
  bits per byte  = sum of token NLL (nats) / ln 2 / UTF-8 bytes of the text

Token loss and perplexity depend on the tokenizer; bits per byte does not
(Gao et al. 2020, "The Pile", Sec. 5), which is what makes languages with very
different segmentation rates (Devanagari vs Latin script under one
SentencePiece model) and models with different vocabularies comparable.

`LanguageLossAccumulator` collects (NLL sum, tokens, bytes) per language
from per-language sums (the per-language evaluator's), per-token arrays or
per-example sums. `seqio_metrics` computes the same numbers as SeqIO score
metric functions.
"""

import dataclasses
import math

import numpy as np

from tiered_routing.tier1 import languages

LN2 = math.log(2.0)
# SentencePiece's word-boundary marker; it stands for one ASCII space.
_SPM_SPACE = "\u2581"


def _check_count(name: str, value) -> None:
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


def token_loss(nll_sum: float, num_tokens: float) -> float:
  """Mean negative log-likelihood per token, in nats."""
  _check_count("num_tokens", num_tokens)
  return float(nll_sum) / float(num_tokens)


def perplexity(nll_sum: float, num_tokens: float) -> float:
  """exp(mean token NLL); +inf where that overflows a float64."""
  try:
    return math.exp(token_loss(nll_sum, num_tokens))
  except OverflowError:
    return math.inf


def bits_per_byte(nll_sum: float, num_bytes: float) -> float:
  """Total NLL converted to bits, per UTF-8 byte of the scored text."""
  _check_count("num_bytes", num_bytes)
  return float(nll_sum) / LN2 / float(num_bytes)


def num_utf8_bytes(text: str | bytes) -> int:
  """Length of `text` in UTF-8 bytes (bytes are taken as already encoded)."""
  if isinstance(text, bytes):
    return len(text)
  if not isinstance(text, str):
    raise ValueError(f"text must be str or bytes, got {type(text).__name__}")
  return len(text.encode("utf-8"))


def piece_num_bytes(vocabulary) -> np.ndarray:
  """UTF-8 bytes each token id stands for, for in-graph byte counting.

  Summing this table over a document's token ids gives the document's bytes
  (after the tokenizer's normalization) plus one: SentencePiece's dummy
  prefix turns the leading word into "▁word", counted here as a space.
  Control pieces (pad, EOS), <unk> and unused pieces count 0 bytes;
  byte-fallback pieces count 1. SeqIO adds its extra ids to the tokenizer as
  ordinary pieces ("▁<extra_id_0>"), so they count the bytes they decode to.

  Args:
    vocabulary: a `seqio.SentencePieceVocabulary` (its `tokenizer` and
      `vocab_size` are used) or a `sentencepiece.SentencePieceProcessor`.

  Returns:
    int32[vocab_size].
  """
  if hasattr(vocabulary, "tokenizer"):  # seqio.SentencePieceVocabulary
    sp, size = vocabulary.tokenizer, vocabulary.vocab_size
  else:
    sp, size = vocabulary, None
  if not hasattr(sp, "id_to_piece"):
    raise ValueError(
        f"piece_num_bytes needs a SentencePiece vocabulary or processor, got "
        f"{type(vocabulary).__name__}"
    )
  num_pieces = sp.get_piece_size()
  out = np.zeros(max(size or 0, num_pieces), np.int32)
  for i in range(num_pieces):
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
      continue
    if sp.is_byte(i):
      out[i] = 1
    else:
      out[i] = num_utf8_bytes(sp.id_to_piece(i).replace(_SPM_SPACE, " "))
  return out


@dataclasses.dataclass(frozen=True)
class LossStats:
  """Sufficient statistics of the LM metrics of one set of scored text.

  Attributes:
    nll_sum: total negative log-likelihood in nats.
    num_tokens: number of scored tokens (weights summed).
    num_bytes: UTF-8 bytes of the scored text; 0 if not tracked.
  """

  nll_sum: float = 0.0
  num_tokens: float = 0.0
  num_bytes: float = 0.0

  def __add__(self, other: "LossStats") -> "LossStats":
    return LossStats(
        self.nll_sum + other.nll_sum,
        self.num_tokens + other.num_tokens,
        self.num_bytes + other.num_bytes,
    )

  @property
  def loss(self) -> float:
    return token_loss(self.nll_sum, self.num_tokens)

  @property
  def perplexity(self) -> float:
    return perplexity(self.nll_sum, self.num_tokens)

  @property
  def bits_per_byte(self) -> float:
    return bits_per_byte(self.nll_sum, self.num_bytes)

  def as_dict(self) -> dict[str, float]:
    """Metrics that are defined: loss/perplexity need tokens, bpb bytes."""
    out = {"num_tokens": float(self.num_tokens)}
    if self.num_tokens > 0:
      out["loss"] = self.loss
      out["perplexity"] = self.perplexity
    if self.num_bytes > 0:
      out["num_bytes"] = float(self.num_bytes)
      out["bits_per_byte"] = self.bits_per_byte
    return out


class LanguageLossAccumulator:
  """(NLL sum, tokens, bytes) per language, merged over eval batches."""

  def __init__(self):
    self._stats: dict[str, LossStats] = {}

  def add(
      self, code: str, nll_sum: float, num_tokens: float, num_bytes: float = 0.0
  ) -> None:
    """Adds one language's sums (e.g. of one example or one batch)."""
    languages.get(code)
    for name, value in (("num_tokens", num_tokens), ("num_bytes", num_bytes)):
      if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    prev = self._stats.get(code, LossStats())
    self._stats[code] = prev + LossStats(
        float(nll_sum), float(num_tokens), float(num_bytes)
    )

  def add_language_sums(
      self, loss_sum_N, weight_sum_N, num_bytes_N
  ) -> None:
    """Adds per-language-id sums [NUM_LANGUAGES] (e.g. of `eval_step`).

    Languages with zero weight (absent from the batch) are skipped.
    """
    for i in np.flatnonzero(np.asarray(weight_sum_N)):
      self.add(
          languages.CODES[i], loss_sum_N[i], weight_sum_N[i], num_bytes_N[i]
      )

  def add_tokens(
      self, language_ids, token_nll, weights, token_bytes=None
  ) -> None:
    """Adds per-token values of any (equal) shape, e.g. [B, L].

    Args:
      language_ids: int language id (index in `languages.LANGUAGES`) of every
        token; ignored where the weight is 0 (padding may carry any id).
      token_nll: negative log-likelihood of every token, nats.
      weights: loss weights (0 = not scored, e.g. padding).
      token_bytes: optional UTF-8 bytes per token (`piece_num_bytes` gathered
        at the target ids); scaled by the weights like everything else.
    """
    ids = np.asarray(language_ids).reshape(-1)
    nll = np.asarray(token_nll, np.float64).reshape(-1)
    w = np.asarray(weights, np.float64).reshape(-1)
    nbytes = (
        np.zeros_like(w)
        if token_bytes is None
        else np.asarray(token_bytes, np.float64).reshape(-1)
    )
    if not ids.shape == nll.shape == w.shape == nbytes.shape:
      raise ValueError(
          "language_ids, token_nll, weights and token_bytes need the same "
          f"size, got {ids.size}, {nll.size}, {w.size}, {nbytes.size}"
      )
    scored = w != 0
    bad = ids[scored & ((ids < 0) | (ids >= languages.NUM_LANGUAGES))]
    if bad.size:
      raise ValueError(
          f"language id {int(bad[0])} of a scored token is out of range; "
          f"allowed: 0..{languages.NUM_LANGUAGES - 1}"
      )
    ids = np.where(scored, ids, 0).astype(np.int64)
    n = languages.NUM_LANGUAGES
    sums = [
        np.bincount(ids, weights=v * w, minlength=n)
        for v in (nll, np.ones_like(w), nbytes)
    ]
    for lang_id in np.flatnonzero(sums[1]):
      self.add(
          languages.CODES[lang_id],
          sums[0][lang_id],
          sums[1][lang_id],
          sums[2][lang_id],
      )

  def merge(self, other: "LanguageLossAccumulator") -> None:
    """Adds another accumulator's sums (e.g. from another host)."""
    for code, s in other.per_language().items():
      self.add(code, s.nll_sum, s.num_tokens, s.num_bytes)

  def per_language(self) -> dict[str, LossStats]:
    """Stats of every language seen, in canonical language order."""
    return {c: self._stats[c] for c in languages.CODES if c in self._stats}

  def total(self) -> LossStats:
    """Token-weighted pool of all languages."""
    return sum(self._stats.values(), LossStats())

  def results(self) -> dict[str, float]:
    """Flat metrics: '{code}/{metric}', 'all/{metric}' (pooled) and
    'macro/{metric}' (unweighted mean over languages, each language counting
    once whatever its size)."""
    out = {}
    per_lang = self.per_language()
    for code, stats in per_lang.items():
      out.update({f"{code}/{k}": v for k, v in stats.as_dict().items()})
    out.update({f"all/{k}": v for k, v in self.total().as_dict().items()})
    for metric in ("loss", "bits_per_byte"):
      values = [
          out[f"{c}/{metric}"] for c in per_lang if f"{c}/{metric}" in out
      ]
      if values and len(values) == len(per_lang):
        out[f"macro/{metric}"] = float(np.mean(values))
    return out


TABLE_COLUMNS = ("loss", "perplexity", "bits_per_byte", "num_tokens")


def format_language_table(results, prefix: str = "") -> str:
  """The per-language table the eval binary prints: every language with
  results, then the pooled 'all' and the language mean 'macro'.

  Args:
    results: flat '{prefix}{code}/{metric}' values.
    prefix: e.g. 'routing/oracle/'.
  """
  header = f"{'lang':<6}" + "".join(f"{c:>15}" for c in TABLE_COLUMNS)
  lines = [header]
  for code in (*languages.CODES, "all", "macro"):
    if f"{prefix}{code}/loss" not in results:
      continue
    cells = []
    for column in TABLE_COLUMNS:
      value = results.get(f"{prefix}{code}/{column}")
      if value is None:
        cells.append(" " * 15)
      elif column == "num_tokens":
        cells.append(f"{int(value):>15,}")
      else:
        cells.append(f"{value:>15.4f}")
    lines.append(f"{code:<6}" + "".join(cells))
  return "\n".join(lines)
