"""Tests for the per-language evaluator (eval.language_eval)."""

import jax
import numpy as np
import pytest
import seqio

from tiered_routing.data import corpora
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages

P, ROWS, LENGTH = 2, 4, 32


def _model_config():
  return decoder_config.DecoderConfig(
      vocab_size=4096,
      d_model=32,
      num_heads=2,
      head_dim=16,
      num_layers=1,
      moe_every=1,
      num_experts=4,
      expert_d_ff=32,
      top_k=2,
      num_partitions=P,
      group_size=64,
      dispatch="einsum",
  )


@pytest.mark.parametrize("partitions_alone", [False, True])
def test_sums_every_language_exactly_through_its_partition(partitions_alone):
  config = _model_config()
  model = transformer.TieredDecoder(config)
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 4096, (P, ROWS, LENGTH)).astype(np.int32)
  langs = rng.integers(0, languages.NUM_LANGUAGES, (P, ROWS, LENGTH))
  langs = langs.astype(np.int32)
  weights = (rng.random((P, ROWS, LENGTH)) < 0.8).astype(np.int32)
  batch = {
      "decoder_input_tokens": tokens,
      "decoder_target_tokens": np.roll(tokens, -1, axis=-1),
      "decoder_loss_weights": weights,
      "decoder_language_ids": langs,
  }
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  blocks = [[{k: v[q] for k, v in batch.items()}] for q in range(P)]
  evaluator = language_eval.LanguageEvaluator(
      config, blocks, vocabulary=None, partitions_alone=partitions_alone
  )
  losses = evaluator.evaluate(params).losses
  logits = np.asarray(
      jax.jit(model.apply)({"params": params}, tokens), np.float64
  )
  log_probs = (
      logits
      - np.log(
          np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
      )
      - logits.max(-1, keepdims=True)
  )
  nll = -np.take_along_axis(
      log_probs, batch["decoder_target_tokens"][..., None], -1
  )[..., 0]
  for lang in range(languages.NUM_LANGUAGES):
    mask = (langs == lang) & (weights > 0)
    stats = losses[languages.CODES[lang]]
    np.testing.assert_allclose(stats.nll_sum, nll[mask].sum(), rtol=1e-5)
    assert stats.num_tokens == mask.sum()


def test_bytes_per_language_counts_detokenized_text():
  vocab = seqio.SentencePieceVocabulary(corpora.UDHR16.vocab_path())
  texts = {"en": "All human beings are born free.", "hi": "सभी मनुष्य"}
  ids = {c: vocab.encode(t) + [1] for c, t in texts.items()}  # 1 = EOS.
  n_en, n_hi = len(ids["en"]), len(ids["hi"])
  length = n_en + n_hi + 3
  row = np.zeros((2, length), np.int32)
  row[0, :n_en], row[0, n_en : n_en + n_hi] = ids["en"], ids["hi"]
  segments = np.zeros_like(row)
  segments[0, :n_en], segments[0, n_en : n_en + n_hi] = 1, 2
  langs = np.zeros_like(row)
  langs[0, :n_en] = languages.CODES.index("en")
  langs[0, n_en : n_en + n_hi] = languages.CODES.index("hi")
  batch = {
      "decoder_target_tokens": row[None],
      "decoder_loss_weights": (segments > 0).astype(np.int32)[None],
      "decoder_language_ids": langs[None],
      "decoder_segment_ids": segments[None],
  }
  out = language_eval.bytes_per_language(batch, vocab)
  assert out[languages.CODES.index("en")] == len(texts["en"].encode())
  assert out[languages.CODES.index("hi")] == len(texts["hi"].encode())
  assert out.sum() == sum(len(t.encode()) for t in texts.values())
