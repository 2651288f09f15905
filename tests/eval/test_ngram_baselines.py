"""n-gram baselines: golden values by hand, normalization, planted data."""

import numpy as np
import pytest

from tiered_routing.eval import ngram_baselines

V = 8


def _golden():
  # Tokens 5 1 | 5 6 1; bigrams (0,5) x2, (5,1), (5,6), (6,1).
  return ngram_baselines.NgramBaseline.fit([[5, 1], [5, 6, 1]], V, alpha=0.1)


def test_unigram_is_add_alpha():
  nll = _golden().unigram_nll(np.array([5, 6, 3]))
  np.testing.assert_allclose(
      np.exp(-nll), [2.1 / 5.8, 1.1 / 5.8, 0.1 / 5.8], rtol=1e-12
  )


def test_bigram_is_interpolated_kneser_ney_by_hand():
  baseline = _golden()
  # n1 = 3 bigram types seen once, n2 = 1 seen twice: D = 3 / (3 + 2).
  assert baseline.discount == pytest.approx(0.6)
  # Continuation types: 5 <- {0}, 1 <- {5, 6}, 6 <- {5}; 4 in all.
  p_cont = {5: 1.1 / 4.8, 1: 2.1 / 4.8, 3: 0.1 / 4.8}
  expected = [
      (1 - 0.6) / 2 + 0.6 * 2 / 2 * p_cont[1],  # p(1 | 5): c(5) = 2.
      (2 - 0.6) / 2 + 0.6 * 1 / 2 * p_cont[5],  # p(5 | 0): one type.
      p_cont[3],  # Unseen context 7: the lower order alone.
  ]
  nll = baseline.bigram_nll(np.array([5, 0, 7]), np.array([1, 5, 3]))
  np.testing.assert_allclose(np.exp(-nll), expected, rtol=1e-12)


def test_every_context_is_a_distribution():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 32, rng.integers(1, 20)) for _ in range(50)]
  baseline = ngram_baselines.NgramBaseline.fit(seqs, 32)
  every = np.arange(32)
  np.testing.assert_allclose(np.exp(-baseline.unigram_nll(every)).sum(), 1)
  for context in range(32):
    p = np.exp(-baseline.bigram_nll(np.full(32, context), every))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    assert (p > 0).all()


def test_planted_bigram_structure_is_found():
  # 3 always follows 2 and 2 follows 3: unigram ~ log 2, bigram ~ 0.
  seqs = [[2, 3] * 20 for _ in range(20)]
  baseline = ngram_baselines.NgramBaseline.fit(seqs, V)
  rows = {
      "decoder_input_tokens": np.array([[0, 2, 3, 2]]),
      "decoder_target_tokens": np.array([[2, 3, 2, 3]]),
      "decoder_loss_weights": np.array([[1, 1, 1, 1]]),
  }
  scores = ngram_baselines.score_rows(baseline, rows)
  assert scores["tokens"] == 4
  assert scores["unigram_loss"] == pytest.approx(np.log(2), abs=0.01)
  assert scores["bigram_loss"] < 0.05


def test_score_rows_skips_unscored_tokens():
  baseline = _golden()
  rows = {
      "decoder_input_tokens": np.array([[0, 5, 6, 0]]),
      "decoder_target_tokens": np.array([[5, 6, 1, 0]]),
      "decoder_loss_weights": np.array([[1, 0, 1, 0]]),
  }
  scores = ngram_baselines.score_rows(baseline, rows)
  kept = baseline.bigram_nll(np.array([0, 6]), np.array([5, 1]))
  assert scores["tokens"] == 2
  assert scores["bigram_loss"] == pytest.approx(kept.mean())


@pytest.mark.parametrize(
    "seqs, message",
    [([[1, 9]], r"\[1, 9\]; allowed: \[0, 8\)"), ([[]], "No training tokens")],
)
def test_bad_training_data_is_named(seqs, message):
  with pytest.raises(ValueError, match=message):
    ngram_baselines.NgramBaseline.fit(seqs, V)
