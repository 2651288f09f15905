"""Verbatim memorization: does a model still complete its training text?

MUSE's VerbMem (Shi et al. 2024, arXiv 2407.06460): prompt the model with
the first tokens of a forget-set paragraph, decode greedily, and compare
the continuation with the paragraph's true next tokens by ROUGE-L (Lin
2004). We score token ids, not detokenized words: every language of the
corpus shares one SentencePiece vocabulary and several have no spaces, so
tokens are the one unit comparable across languages. Next to ROUGE-L:
the exact-match rate (the whole continuation reproduced) and the mean
fraction of continuation positions predicted correctly.
"""

from collections.abc import Sequence

import numpy as np


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the longest common subsequence of two token lists."""
  if not len(a) or not len(b):
    return 0
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(
          previous[j] + 1 if x == y else max(previous[j + 1], current[j])
      )
    previous = current
  return previous[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
  """ROUGE-L F1 of a candidate against a reference (0 if either is empty)."""
  lcs = lcs_length(candidate, reference)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(candidate), lcs / len(reference)
  return 2 * precision * recall / (precision + recall)


def continuation_scores(
    generated: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]
) -> dict[str, float]:
  """Mean ROUGE-L, exact-match rate and token accuracy over paragraphs.

  Args:
    generated: each paragraph's greedy continuation (token ids).
    truth: its true continuation, the same length or shorter (a paragraph
      may end early; the generated tokens are cut to its length).

  Returns:
    {'rougel', 'exact', 'token_accuracy'}.
  """
  if len(generated) != len(truth) or not len(truth):
    raise ValueError(
        f"{len(generated)} continuations for {len(truth)} paragraphs; "
        "need the same positive number."
    )
  rouge, exact, accuracy = [], [], []
  for gen, ref in zip(generated, truth):
    ref = [int(t) for t in ref]
    gen = [int(t) for t in gen][: len(ref)]
    if not ref:
      raise ValueError("A true continuation is empty.")
    rouge.append(rouge_l(gen, ref))
    exact.append(float(gen == ref))
    accuracy.append(float(np.mean(np.asarray(gen) == np.asarray(ref))))
  return {
      "rougel": float(np.mean(rouge)),
      "exact": float(np.mean(exact)),
      "token_accuracy": float(np.mean(accuracy)),
  }
