"""Unigram and bigram baselines of a language's training tokens.

A language model's per-language loss means little without the floor that
counting gives for free: an original model that is no better than the
unigram distribution of its training tokens has learned token frequencies,
and "forgetting" a language in it only lowers them. Every table of the
trade-off sweep therefore carries, per language, the loss of

  unigram  add-alpha smoothed token frequencies (alpha = 0.1), and
  bigram   interpolated Kneser-Ney (Kneser and Ney 1995; Chen and Goodman
           1998, eq. 12) with the discount estimated from counts of counts,
           D = n1 / (n1 + 2 n2), backing off to continuation counts that are
           themselves add-alpha smoothed, so every token has probability > 0,

both fitted on the language's training split as the model sees it (the
task's examples cut to the model's sequence length, EOS included, each
sequence starting from the context 0 that the model's shifted inputs
start from), and scored on exactly the tokens the evaluator scores: the
context of a target token is its `decoder_input_tokens` entry.

Shape letters: V vocabulary, T tokens.
"""

import dataclasses
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np
import seqio

DEFAULT_ALPHA = 0.1
START = 0  # The decoder's input at a sequence start (the pad id).


@dataclasses.dataclass(frozen=True)
class NgramBaseline:
  """Counts of one language's training tokens, and the two baselines.

  Attributes:
    vocab_size: V.
    alpha: add-alpha smoothing of the unigram and continuation counts.
    discount: the Kneser-Ney discount D.
    unigram_V: token counts.
    bigram_keys: sorted context * V + token of every bigram type.
    bigram_counts: their counts.
    context_V: c(v), bigram tokens with context v.
    context_types_V: N1+(v .), distinct tokens after v.
    continuation_V: N1+(. w), distinct contexts before w.
  """

  vocab_size: int
  alpha: float
  discount: float
  unigram_V: np.ndarray
  bigram_keys: np.ndarray
  bigram_counts: np.ndarray
  context_V: np.ndarray
  context_types_V: np.ndarray
  continuation_V: np.ndarray

  @classmethod
  def fit(
      cls,
      sequences: Iterable[np.ndarray],
      vocab_size: int,
      alpha: float = DEFAULT_ALPHA,
  ) -> "NgramBaseline":
    """Counts token sequences (each scored from context START)."""
    tokens, contexts = [], []
    for seq in sequences:
      seq = np.asarray(seq, np.int64).reshape(-1)
      if seq.size:
        tokens.append(seq)
        contexts.append(np.concatenate([[START], seq[:-1]]))
    if not tokens:
      raise ValueError("No training tokens to fit a baseline on.")
    tokens_T, contexts_T = np.concatenate(tokens), np.concatenate(contexts)
    if tokens_T.min() < 0 or tokens_T.max() >= vocab_size:
      raise ValueError(
          f"token ids in [{tokens_T.min()}, {tokens_T.max()}]; allowed: "
          f"[0, {vocab_size}) (vocab_size={vocab_size})."
      )
    keys, counts = np.unique(
        contexts_T * vocab_size + tokens_T, return_counts=True
    )
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    discount = float(n1 / (n1 + 2 * n2)) if n1 + n2 else 0.5
    ctx, tok = keys // vocab_size, keys % vocab_size
    return cls(
        vocab_size=vocab_size,
        alpha=alpha,
        discount=min(max(discount, 0.05), 0.95),
        unigram_V=np.bincount(tokens_T, minlength=vocab_size),
        bigram_keys=keys,
        bigram_counts=counts,
        context_V=np.bincount(ctx, weights=counts, minlength=vocab_size),
        context_types_V=np.bincount(ctx, minlength=vocab_size),
        continuation_V=np.bincount(tok, minlength=vocab_size),
    )

  def unigram_nll(self, tokens_T: np.ndarray) -> np.ndarray:
    """float64 [T]: -log p(token) in nats."""
    total = self.unigram_V.sum() + self.alpha * self.vocab_size
    p = (self.unigram_V[tokens_T] + self.alpha) / total
    return -np.log(p)

  def continuation_probs(self) -> np.ndarray:
    """float64 [V]: the smoothed Kneser-Ney lower order p_cont(w)."""
    total = self.continuation_V.sum() + self.alpha * self.vocab_size
    return (self.continuation_V + self.alpha) / total

  def bigram_nll(
      self, contexts_T: np.ndarray, tokens_T: np.ndarray
  ) -> np.ndarray:
    """float64 [T]: -log p_KN(token | context) in nats."""
    contexts_T = np.asarray(contexts_T, np.int64)
    tokens_T = np.asarray(tokens_T, np.int64)
    keys = contexts_T * self.vocab_size + tokens_T
    at = np.searchsorted(self.bigram_keys, keys)
    at = np.minimum(at, len(self.bigram_keys) - 1)
    pair = np.where(self.bigram_keys[at] == keys, self.bigram_counts[at], 0)
    c_v = self.context_V[contexts_T]
    seen = c_v > 0
    safe = np.where(seen, c_v, 1.0)
    d = self.discount
    backoff = np.where(seen, d * self.context_types_V[contexts_T] / safe, 1.0)
    direct = np.where(seen, np.maximum(pair - d, 0.0) / safe, 0.0)
    p = direct + backoff * self.continuation_probs()[tokens_T]
    return -np.log(p)


def task_sequences(
    task_name: str,
    sequence_length: int,
    split: str = "train",
    max_examples: Optional[int] = None,
) -> Iterator[np.ndarray]:
  """A task's token sequences as the model reads them: EOS-terminated,
  cut to at most `sequence_length` tokens, in split order."""
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      {"targets": sequence_length}, split=split, shuffle=False, num_epochs=1
  )
  if max_examples is not None:
    ds = ds.take(max_examples)
  for ex in ds.as_numpy_iterator():
    yield ex["targets"]


def score_rows(
    baseline: NgramBaseline, rows: Mapping[str, np.ndarray]
) -> dict[str, float]:
  """Mean baseline losses over the scored tokens of evaluation rows.

  Args:
    baseline: the language's baseline.
    rows: {'decoder_input_tokens', 'decoder_target_tokens',
      'decoder_loss_weights'} of one language, any matching shapes.

  Returns:
    {'unigram_loss', 'bigram_loss'} in nats/token and 'tokens' scored.
  """
  scored = np.asarray(rows["decoder_loss_weights"]).reshape(-1) > 0
  tokens_T = np.asarray(rows["decoder_target_tokens"]).reshape(-1)[scored]
  contexts_T = np.asarray(rows["decoder_input_tokens"]).reshape(-1)[scored]
  if not tokens_T.size:
    raise ValueError("No scored tokens (every loss weight is 0).")
  return {
      "unigram_loss": float(baseline.unigram_nll(tokens_T).mean()),
      "bigram_loss": float(baseline.bigram_nll(contexts_T, tokens_T).mean()),
      "tokens": int(tokens_T.size),
  }
