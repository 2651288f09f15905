"""Tier-1 inference routing: oracle, classifier and ensemble invariants."""

import functools

import jax
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from tiered_routing.tier1 import inference_routing as ir
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

P, B, L, V = 3, 2, 6, 7


def _logprobs(seed=0, scale=2.0, shape=(P, B, L, V)):
  rng = np.random.default_rng(seed)
  return log_softmax(scale * rng.normal(size=shape), axis=-1).astype(np.float32)


def _targets(seed=1):
  return np.random.default_rng(seed).integers(0, V, size=(B, L))


def test_gather_and_select_partition():
  lp = _logprobs()
  tgt = _targets()
  tok = np.asarray(ir.gather_targets(lp, tgt))
  assert tok.shape == (P, B, L)
  assert tok[2, 1, 3] == lp[2, 1, 3, tgt[1, 3]]
  part_B = np.array([2, 0])
  np.testing.assert_array_equal(
      ir.select_partition(lp, part_B), np.stack([lp[2, 0], lp[0, 1]])
  )
  part_BxL = np.tile(np.arange(L) % P, (B, 1))
  sel = np.asarray(ir.select_partition(tok, part_BxL))
  assert sel[1, 4] == tok[4 % P, 1, 4]


@pytest.mark.parametrize("weighting", ["posterior", "prefix"])
def test_ensemble_of_one_partition_is_that_partition(weighting):
  lp = _logprobs(shape=(1, B, L, V))
  tok = ir.gather_targets(lp, _targets())
  ll = ir.token_log_likelihood(
      "ensemble", tok, posterior=np.ones((B, 1)), weighting=weighting
  )
  np.testing.assert_allclose(ll, tok[0], rtol=1e-6)
  log_w = ir.ensemble_log_weights(
      tok, weighting=weighting, posterior=np.ones((B, 1))
  )
  np.testing.assert_allclose(ir.mixture_log_probs(lp, log_w), lp[0], rtol=1e-6)


def test_one_hot_posterior_equals_that_partition():
  lp = _logprobs()
  tok = ir.gather_targets(lp, _targets())
  posterior = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
  expected = np.stack([tok[2, 0], tok[0, 1]])
  ens = ir.token_log_likelihood("ensemble", tok, posterior=posterior)
  np.testing.assert_array_equal(ens, expected)  # exact: log 1 = 0
  cls = ir.token_log_likelihood("classifier", tok, posterior=posterior)
  np.testing.assert_array_equal(cls, expected)
  full = ir.mixture_log_probs(lp, ir.posterior_log_weights(posterior))
  np.testing.assert_array_equal(full, np.stack([lp[2, 0], lp[0, 1]]))


def test_mixture_bounds_and_float64_reference():
  lp = _logprobs(seed=3)
  posterior = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], np.float32)
  log_w = np.log(posterior)[:, None, :]  # [B, 1, P]
  mix = np.asarray(ir.mixture_log_probs(lp, np.log(posterior)), np.float64)
  terms = np.moveaxis(log_w, -1, 0)[..., None] + lp  # [P, B, L, V]
  np.testing.assert_allclose(
      mix, logsumexp(terms.astype(np.float64), axis=0), rtol=1e-5, atol=1e-6
  )
  assert (mix >= terms.max(axis=0) - 1e-6).all()
  assert (mix <= lp.max(axis=0) + 1e-6).all()  # no better than the best
  # A mixture of distributions is a distribution.
  np.testing.assert_allclose(logsumexp(mix, axis=-1), 0.0, atol=1e-5)


def test_mixture_is_stable_where_probabilities_underflow():
  tok = np.full((2, 1, 1), -2000.0, np.float32)  # exp underflows to 0
  tok[1] = -2001.0
  ll = ir.mixture_token_log_likelihood(tok, np.log([[0.5, 0.5]]))
  expected = np.log(0.5) - 2000.0 + np.log1p(np.exp(-1.0))
  np.testing.assert_allclose(ll[0, 0], expected, rtol=1e-6)


def test_prefix_weights_golden():
  # Two partitions, one row of three tokens, uniform prior.
  tok = np.log(np.array([[[0.5, 0.5, 0.5]], [[0.25, 0.25, 0.25]]]))
  log_w = np.asarray(ir.prefix_log_weights(tok))
  w = np.exp(log_w[0])  # [L, P]
  np.testing.assert_allclose(w[0], [0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(w[1], [2 / 3, 1 / 3], rtol=1e-6)  # 0.5 : 0.25
  np.testing.assert_allclose(w[2], [0.8, 0.2], rtol=1e-6)  # 0.25 : 0.0625
  top1 = np.exp(np.asarray(ir.prefix_log_weights(tok, top_k=1))[0])
  np.testing.assert_array_equal(top1[1:], [[1.0, 0.0], [1.0, 0.0]])


def test_prefix_ensemble_is_bayesian_model_average():
  # Sum_t log sum_p P(p | x_<t) p_p(x_t) = log sum_p prior_p p_p(x), per
  # packed sequence, ignoring padding.
  lp = _logprobs(seed=5, shape=(P, B, L, V))
  tok = np.asarray(ir.gather_targets(lp, _targets(seed=6)), np.float64)
  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = segments > 0
  prior = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
  ll = ir.token_log_likelihood(
      "ensemble",
      tok,
      posterior=prior,
      weighting="prefix",
      mask_BxL=mask,
      segment_ids_BxL=segments,
  )
  sums = ir.sequence_log_likelihood(ll, mask, segments)
  for b, s in [(0, 1), (0, 2), (1, 1)]:
    sel = segments[b] == s
    expected = logsumexp(np.log(prior[b]) + tok[:, b, sel].sum(axis=-1))
    np.testing.assert_allclose(sums[b, s], expected, rtol=1e-5)
  assert sums[0, 0] == 0.0
  # Top-k = P keeps everything.
  ll_all = ir.token_log_likelihood(
      "ensemble",
      tok,
      posterior=prior,
      weighting="prefix",
      mask_BxL=mask,
      segment_ids_BxL=segments,
      top_k=P,
  )
  np.testing.assert_allclose(ll_all, ll, rtol=1e-6)


def test_per_row_posterior_when_num_partitions_equals_length():
  # [B, P] with P == L must be read per row, not as [B, L] per token.
  tok = _logprobs(shape=(4, 2, 4, V))[..., 0]
  posterior = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  for mode in ("classifier", "ensemble"):
    ll = ir.token_log_likelihood(mode, tok, posterior=posterior)
    np.testing.assert_array_equal(ll, np.stack([tok[2, 0], tok[1, 1]]))


def test_top_k_posterior_renormalizes():
  log_w = np.asarray(ir.posterior_log_weights([[0.1, 0.6, 0.3]], top_k=2))
  np.testing.assert_allclose(np.exp(log_w), [[0.0, 2 / 3, 1 / 3]], rtol=1e-6)
  with pytest.raises(ValueError, match="top_k=0"):
    ir.posterior_log_weights([[0.5, 0.5]], top_k=0)


def test_oracle_and_routing_accuracy():
  scheme = schemes.family(4)
  ids = np.array([languages.language_id(c) for c in ("hi", "zh", "ur", "en")])
  oracle = ir.oracle_partitions(ids, scheme)
  np.testing.assert_array_equal(oracle, [0, 1, 2, 3])
  posterior = np.array(
      [[0.9, 0.1, 0, 0], [0.1, 0.8, 0.1, 0], [0, 0, 0.4, 0.6], [0, 0, 0, 1.0]]
  )
  predicted = ir.classifier_partitions(posterior)
  np.testing.assert_array_equal(predicted, [0, 1, 3, 3])
  assert float(ir.routing_accuracy(predicted, oracle)) == 0.75
  assert float(ir.routing_accuracy(predicted, oracle, [1, 1, 0, 1])) == 1.0
  # Oracle per token of a packed row: each token goes to its language's
  # partition.
  tok = np.arange(4 * 1 * 4, dtype=np.float32).reshape(4, 1, 4)
  ll = ir.token_log_likelihood(
      "oracle", tok, language_ids=ids[None], scheme=scheme
  )
  np.testing.assert_array_equal(
      ll, [[tok[0, 0, 0], tok[1, 0, 1], tok[2, 0, 2], tok[3, 0, 3]]]
  )
  with pytest.raises(ValueError, match="shape"):
    ir.routing_accuracy(predicted, oracle[:2])


def test_jittable():
  lp = _logprobs()
  tok = ir.gather_targets(lp, _targets())
  fn = jax.jit(
      functools.partial(
          ir.token_log_likelihood, "ensemble", weighting="prefix", top_k=2
      )
  )
  np.testing.assert_allclose(
      fn(tok, posterior=np.full((B, P), 1 / P)),
      ir.token_log_likelihood(
          "ensemble",
          tok,
          posterior=np.full((B, P), 1 / P),
          weighting="prefix",
          top_k=2,
      ),
      rtol=1e-6,
  )


def test_bad_arguments():
  tok = np.zeros((P, B, L), np.float32)
  with pytest.raises(ValueError, match="Unknown mode 'vote'"):
    ir.token_log_likelihood("vote", tok)
  with pytest.raises(ValueError, match="needs language_ids and scheme"):
    ir.token_log_likelihood("oracle", tok)
  with pytest.raises(ValueError, match="needs a posterior"):
    ir.token_log_likelihood("classifier", tok)
  with pytest.raises(ValueError, match="Unknown weighting 'max'"):
    ir.token_log_likelihood(
        "ensemble", tok, posterior=np.ones((B, P)), weighting="max"
    )
  with pytest.raises(ValueError, match="expected"):
    ir.token_log_likelihood("ensemble", tok, posterior=np.ones((B, P + 1)))
  with pytest.raises(ValueError, match="rank 3"):
    ir.token_log_likelihood("ensemble", tok[0], posterior=np.ones((B, P)))
