"""Membership inference, verbatim memory and routing shift: golden values by
hand and a planted case (a model that memorized four paragraphs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiered_routing.data import feature_rows
from tiered_routing.eval import decoding
from tiered_routing.model import decoder_config
from tiered_routing.model import forward
from tiered_routing.model import transformer
from tiered_routing.unlearning import audit_scoring
from tiered_routing.unlearning import membership_inference as mia
from tiered_routing.unlearning import verbatim_memory

V, N, LENGTH = 64, 32, 16


def test_auc_golden_with_ties():
  # Pairs: 3>1, 3>2, 2>1 win; 2=2 ties (one half): 3.5 / 4.
  assert mia.auc([3.0, 2.0], [1.0, 2.0]) == 0.875
  assert mia.auc([1.0], [1.0]) == 0.5
  assert mia.auc([0.0, 0.0], [1.0, 2.0]) == 0.0
  with pytest.raises(ValueError, match="0 non-members"):
    mia.auc([1.0], [])


def test_privleak_golden():
  assert mia.privleak(0.75, 0.5) == 0.5
  assert mia.privleak(0.5, 0.5) == 0.0
  assert mia.privleak(0.25, 0.5) == -0.5


def test_minkpp_by_hand():
  # Uniform next-token distribution: no spread, so no signal (0).
  _, uniform = mia.token_statistics(jnp.zeros((1, 4)), jnp.array([2]))
  assert float(uniform[0]) == 0.0
  # p = (1/2, 1/4, 1/4): mu = sum p log p, sigma^2 = sum p (log p)^2 - mu^2.
  p = np.array([0.5, 0.25, 0.25])
  logp, mk = mia.token_statistics(jnp.log(jnp.asarray(p))[None], jnp.array([0]))
  mu = np.sum(p * np.log(p))
  sigma = np.sqrt(np.sum(p * np.log(p) ** 2) - mu**2)
  np.testing.assert_allclose(float(logp[0]), np.log(0.5), rtol=1e-6)
  np.testing.assert_allclose(
      float(mk[0]), (np.log(0.5) - mu) / sigma, rtol=1e-5
  )
  assert mia.min_k_mean([5.0, 1.0, 3.0, 2.0, 4.0], 0.4) == 1.5


def test_paragraph_scores_orientation():
  logp = np.log(np.array([[0.9, 0.9, 1.0], [0.1, 0.1, 1.0]]))
  weights = np.array([[1, 1, 0], [1, 1, 0]])
  s = mia.paragraph_scores(logp, logp, weights, [b"ab", b"ab"], k=0.5)
  assert s.loss[0] > s.loss[1] and s.zlib[0] > s.zlib[1]
  assert s.minkpp[0] > s.minkpp[1]


def test_rouge_l_golden():
  assert verbatim_memory.lcs_length([1, 2, 3, 4], [1, 3, 4, 5]) == 3
  # LCS 3: precision 3/4, recall 3/5, F1 = 2 * .75 * .6 / 1.35.
  np.testing.assert_allclose(
      verbatim_memory.rouge_l([1, 2, 3, 4], [1, 3, 4, 5, 6]), 0.9 / 1.35
  )
  out = verbatim_memory.continuation_scores([[1, 2, 9], [7, 7, 7]],
                                            [[1, 2], [7, 8, 9]])
  assert out["exact"] == 0.5
  np.testing.assert_allclose(out["token_accuracy"], (1.0 + 1 / 3) / 2)


def test_routing_shift_js_bits():
  usage = np.array([[10.0, 0.0], [5.0, 5.0]])
  assert audit_scoring.js_bits(usage, usage) == 0.0
  moved = np.array([[0.0, 10.0], [5.0, 5.0]])
  # Layer 0 moved to a disjoint expert (1 bit), layer 1 did not.
  np.testing.assert_allclose(audit_scoring.js_bits(usage, moved), 0.5)
  assert np.isnan(audit_scoring.js_bits(usage, None))


def test_unpack_segments_moves_each_segment_to_its_own_row():
  packed = {
      "decoder_target_tokens": np.array([[5, 6, 7, 8, 9, 0]]),
      "decoder_input_tokens": np.array([[0, 5, 6, 0, 8, 0]]),
      "decoder_loss_weights": np.array([[1, 1, 1, 1, 1, 0]]),
      "decoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
      "decoder_positions": np.array([[0, 1, 2, 0, 1, 0]]),
      "decoder_language_ids": np.array([[3, 3, 3, 4, 4, 0]]),
  }
  out = feature_rows.unpack_segments(packed, language_id=4)
  np.testing.assert_array_equal(
      out["decoder_target_tokens"], [[8, 9, 0, 0, 0, 0]]
  )
  for feature, want in (("decoder_input_tokens", [0, 8]),
                        ("decoder_segment_ids", [1, 1]),
                        ("decoder_positions", [0, 1])):
    np.testing.assert_array_equal(out[feature], [want + [0, 0, 0, 0]])
  count = lambda rows, **kw: len(
      feature_rows.unpack_segments(rows, 3, **kw)["decoder_target_tokens"])
  assert count(packed, min_tokens=4) == 0
  twice = {k: np.concatenate([v, v]) for k, v in packed.items()}
  assert count(twice) == 1  # A repeated paragraph is kept once.


def _rows(tokens_NxL):
  inputs = np.pad(tokens_NxL[:, :-1], [(0, 0), (1, 0)])
  return {
      "decoder_input_tokens": inputs.astype(np.int32),
      "decoder_target_tokens": tokens_NxL.astype(np.int32),
      "decoder_loss_weights": np.ones_like(tokens_NxL, np.int32),
  }


@functools.lru_cache(maxsize=None)
def _memorizer():
  """(config, trained params, untrained params, members, non-members): a
  tiny MoE decoder trained 300 steps on N random paragraphs only."""
  config = decoder_config.DecoderConfig(
      vocab_size=V, d_model=32, num_heads=2, head_dim=16, num_layers=2,
      d_ff=64, num_experts=4, expert_d_ff=32, top_k=2, moe_every=2,
      group_size=64, dispatch="reference",
  )
  model = transformer.TieredDecoder(config)
  rng = np.random.default_rng(0)
  members = rng.integers(1, V, (N, LENGTH))
  non_members = rng.integers(1, V, (N, LENGTH))
  batch = {k: v[None] for k, v in _rows(members).items()}
  init = model.init(jax.random.PRNGKey(0), batch["decoder_input_tokens"])
  params = init["params"]

  def loss(p):
    logits = forward.forward(model, p, batch).logits_PxBxLxV
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["decoder_target_tokens"]).mean()

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  trained = params
  for _ in range(300):
    trained, state = step(trained, state)
  return config, trained, params, members, non_members


@functools.lru_cache(maxsize=None)
def _statistics(config):
  model = transformer.TieredDecoder(config)

  def statistics(params, rows):
    logits = forward.forward(model, params, rows).logits_PxBxLxV
    return mia.token_statistics(logits, rows["decoder_target_tokens"])

  return jax.jit(statistics)


def _auc(config, params, members, non_members, name):
  scores = []
  for tokens in (members, non_members):
    rows = {k: v[None] for k, v in _rows(tokens).items()}
    logp, mk = _statistics(config)(params, rows)
    texts = [bytes(t.astype(np.uint8)) for t in tokens]
    scores.append(mia.paragraph_scores(
        logp[0], mk[0], rows["decoder_loss_weights"][0], texts))
  return mia.auc(scores[0].get(name), scores[1].get(name))


@pytest.mark.parametrize("name", mia.SCORES)
def test_planted_memorized_paragraphs_are_found(name):
  config, trained, untrained, members, non_members = _memorizer()
  assert _auc(config, trained, members, non_members, name) == 1.0
  # The same paragraphs against a model that never saw them: no signal
  # beyond chance (32 + 32 paragraphs: the null AUC's standard deviation
  # is 0.07, so within 0.25 of one half).
  assert abs(_auc(config, untrained, members, non_members, name) - 0.5) <= 0.25


def test_planted_memorized_paragraphs_are_recited():
  config, trained, untrained, members, non_members = _memorizer()
  sampling = decoding.SamplingConfig(max_new_tokens=8)
  recite = lambda params, tokens: verbatim_memory.continuation_scores(
      decoding.Generator(config, params, 0).generate(
          tokens[:, :8].tolist(), sampling), tokens[:, 8:].tolist())
  assert recite(trained, members)["exact"] == 1.0
  assert recite(trained, non_members)["token_accuracy"] < 0.3
  assert recite(untrained, members)["exact"] == 0.0
