"""Golden tests of loss, perplexity and bits per byte."""

import math

import numpy as np
import pytest
import seqio
import sentencepiece as spm

import tasks  # pylint: disable=unused-import
from tiered_routing.data import corpora
from tiered_routing.eval import lm_metrics


def test_scalar_metrics_golden():
  assert lm_metrics.token_loss(6.0, 4) == 1.5
  assert lm_metrics.perplexity(6.0, 4) == pytest.approx(4.4816890703380645)
  # 6 nats over 3 bytes = 2 nats/byte = 2 / ln 2 bits/byte.
  assert lm_metrics.bits_per_byte(6.0, 3) == pytest.approx(2.8853900817779268)
  assert lm_metrics.perplexity(1e6, 1) == math.inf
  assert lm_metrics.num_utf8_bytes("aé€") == 1 + 2 + 3
  assert lm_metrics.num_utf8_bytes("हि".encode()) == 6


@pytest.mark.parametrize(
    "fn,args",
    [
        (lm_metrics.token_loss, (1.0, 0)),
        (lm_metrics.bits_per_byte, (1.0, 0)),
        (lm_metrics.perplexity, (1.0, -2)),
    ],
)
def test_empty_counts_raise(fn, args):
  with pytest.raises(ValueError, match="must be > 0"):
    fn(*args)


def test_loss_stats_add_and_dict():
  s = lm_metrics.LossStats(2.0, 1, 4) + lm_metrics.LossStats(4.0, 3, 0)
  assert s == lm_metrics.LossStats(6.0, 4, 4)
  d = s.as_dict()
  assert d["loss"] == 1.5
  assert d["bits_per_byte"] == pytest.approx(6.0 / math.log(2) / 4)
  assert "bits_per_byte" not in lm_metrics.LossStats(1.0, 2, 0).as_dict()


def test_accumulator_add_tokens_golden():
  # Language ids: 0 = hi, 5 = vi, 13 = en. Padding (weight 0) carries -1.
  ids = np.array([[0, 0, 13, -1], [13, 0, 5, 5]])
  nll = np.array([[1.0, 2.0, 0.5, 9.0], [1.5, 3.0, 4.0, 2.0]])
  w = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
  nbytes = np.array([[3, 3, 2, 7], [4, 6, 1, 1]])
  acc = lm_metrics.LanguageLossAccumulator()
  acc.add_tokens(ids, nll, w, nbytes)
  acc.add("en", 1.0, 2, 5)  # e.g. a per-example sum from elsewhere.
  per = acc.per_language()
  assert list(per) == ["hi", "vi", "en"]  # canonical order
  assert per["hi"] == lm_metrics.LossStats(6.0, 3, 12)
  assert per["vi"] == lm_metrics.LossStats(4.0, 1, 1)
  assert per["en"] == lm_metrics.LossStats(3.0, 4, 11)
  res = acc.results()
  assert res["hi/loss"] == 2.0
  assert res["en/bits_per_byte"] == pytest.approx(3.0 / math.log(2) / 11)
  assert res["all/loss"] == pytest.approx(13.0 / 8)
  assert res["all/bits_per_byte"] == pytest.approx(13.0 / math.log(2) / 24)
  assert res["macro/loss"] == pytest.approx((2.0 + 4.0 + 0.75) / 3)
  other = lm_metrics.LanguageLossAccumulator()
  other.add("vi", 2.0, 1, 1)
  acc.merge(other)
  assert acc.per_language()["vi"] == lm_metrics.LossStats(6.0, 2, 2)


def test_accumulator_add_language_sums_skips_absent_languages():
  loss = np.zeros(16)
  weight = np.zeros(16)
  nbytes = np.zeros(16)
  loss[[0, 13]], weight[[0, 13]], nbytes[[0, 13]] = (6.0, 3.0), (3, 4), (12, 9)
  acc = lm_metrics.LanguageLossAccumulator()
  acc.add_language_sums(loss, weight, nbytes)
  assert acc.per_language() == {
      "hi": lm_metrics.LossStats(6.0, 3, 12),
      "en": lm_metrics.LossStats(3.0, 4, 9),
  }


def test_accumulator_rejects_bad_language_id():
  acc = lm_metrics.LanguageLossAccumulator()
  with pytest.raises(ValueError, match="language id 16"):
    acc.add_tokens(np.array([16]), np.array([1.0]), np.array([1.0]))
  with pytest.raises(ValueError, match="Unknown language 'xx'"):
    acc.add("xx", 1.0, 1)
  with pytest.raises(ValueError, match="same size"):
    acc.add_tokens(np.zeros(3, int), np.zeros(2), np.zeros(3))


def test_piece_num_bytes_counts_text_bytes():
  sp = spm.SentencePieceProcessor(model_file=corpora.UDHR16.vocab_path())
  table = lm_metrics.piece_num_bytes(sp)
  assert table.shape == (sp.get_piece_size(),)
  assert table[sp.eos_id()] == 0 and table[sp.pad_id()] == 0
  for code in ("hi", "zh", "en", "ar", "ko"):
    for text in corpora.UDHR16.split_lines(code, "validation")[:3]:
      ids = sp.encode(text)
      # +1: the dummy-prefix space SentencePiece puts before the first word.
      assert table[ids].sum() == lm_metrics.num_utf8_bytes(sp.decode(ids)) + 1
  byte_ids = sp.encode("\U0001f600")  # not in the vocabulary: byte fallback
  assert table[byte_ids].sum() == 1 + 4
  seqio_vocab = seqio.SentencePieceVocabulary(corpora.UDHR16.vocab_path(), extra_ids=3)
  table2 = lm_metrics.piece_num_bytes(seqio_vocab)
  assert table2.shape == (sp.get_piece_size() + 3,)
  np.testing.assert_array_equal(table2[: table.size], table)
  # SeqIO's extra ids are pieces like "▁<extra_id_0>": a space + 12 bytes.
  np.testing.assert_array_equal(table2[table.size :], [13, 13, 13])
  with pytest.raises(ValueError, match="SentencePiece"):
    lm_metrics.piece_num_bytes(object())


def test_language_table_lists_each_language_then_all_and_macro():
  results = {
      "ur/loss": 3.0, "ur/perplexity": math.exp(3.0),
      "ur/bits_per_byte": 1.25, "ur/num_tokens": 1234.0,
      "hi/loss": 2.0, "hi/perplexity": math.exp(2.0),
      "hi/bits_per_byte": 1.0, "hi/num_tokens": 10.0,
      "all/loss": 2.5, "macro/loss": 2.5,
  }
  lines = lm_metrics.format_language_table(results).splitlines()
  assert lines[0].split() == ["lang", "loss", "perplexity", "bits_per_byte",
                              "num_tokens"]
  assert [line.split()[0] for line in lines[1:]] == ["hi", "ur", "all",
                                                     "macro"]
  assert lines[2].split() == ["ur", "3.0000", f"{math.exp(3.0):.4f}",
                              "1.2500", "1,234"]
  assert lines[3].split() == ["all", "2.5000"]
