"""Golden tests of the SeqIO score metric fns and the tasks' use of them."""

import math

import numpy as np
import pytest
import seqio

import tasks  # pylint: disable=unused-import
from tiered_routing.data import corpora
from tiered_routing.eval import seqio_metrics


def test_seqio_score_metrics_golden():
  targets = ["ab", "é"]  # 2 + 2 UTF-8 bytes
  scores = np.array([-1.0, -3.0])  # log-likelihood sums
  out = seqio_metrics.bits_per_byte_metric(targets, scores)
  assert out["bits_per_byte"] == pytest.approx(1 / math.log(2))
  assert out["num_bytes"] == 4
  assert seqio_metrics.log_likelihood_metric(targets, scores) == {
      "mean_log_likelihood": -2.0
  }
  # One token per character plus EOS: 3 + 2 tokens.
  tok = seqio_metrics.make_token_loss_metric(len)(targets, scores)
  assert tok["loss"] == pytest.approx(0.8)
  assert tok["perplexity"] == pytest.approx(math.exp(0.8))
  assert tok["num_tokens"] == 5
  with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
    seqio_metrics.bits_per_byte_metric(targets, [[-1.0, -3.0]])


def test_seqio_recognises_score_metrics():
  vocab = seqio.SentencePieceVocabulary(corpora.UDHR16.vocab_path())
  fns = seqio_metrics.score_metric_fns(vocab)
  task = seqio.Task(
      "tr_test_eval_metrics_task",
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files: None, splits=["validation"]
      ),
      output_features={"targets": seqio.Feature(vocab)},
      metric_fns=fns,
  )
  assert len(task.score_metric_fns) == 3
  assert not task.predict_metric_fns
  text = corpora.UDHR16.split_lines("en", "validation")[0]
  out = fns[2]([text], [-10.0])
  assert out["num_tokens"] == len(vocab.encode(text)) + 1


def test_scored_targets_count_the_example_not_the_document():
  vocab = seqio.SentencePieceVocabulary(corpora.UDHR16.vocab_path())
  post = seqio_metrics.scored_target_postprocessor(vocab)
  text = "All human beings are born free and equal."
  ids = vocab.encode(text)
  # Two chunks of one document, as split_to_length makes them: each carries
  # the whole document as targets_pretokenized.
  chunks = [ids[:3], ids[3:] + [1]]  # 1 = EOS
  targets = [
      post(text, example={"targets": np.array(c)}, is_target=True)
      for c in chunks
  ]
  assert targets[0] == seqio_metrics.ScoredTarget(vocab.decode(chunks[0]), 3)
  assert targets[1].num_tokens == len(ids) - 3 + 1
  assert post("pred", example={"targets": ids}, is_target=False) == "pred"
  scores = [-2.0, -6.0]
  num_bytes = sum(len(t.text.encode()) for t in targets)
  assert num_bytes < 2 * len(text)  # the document would count twice
  out = seqio_metrics.bits_per_byte_metric(targets, scores)
  assert out["num_bytes"] == num_bytes
  tok = seqio_metrics.score_metric_fns(vocab)[2](targets, scores)
  assert tok["num_tokens"] == len(ids) + 1
  assert tok["loss"] == pytest.approx(8.0 / (len(ids) + 1))


def test_sample_tasks_register_score_metrics():
  task = seqio.get_mixture_or_task("tr.sample.hi_v1")
  assert len(task.score_metric_fns) == 3 and not task.predict_metric_fns
  ex = next(
      task.get_dataset(
          {"targets": 16}, split="validation", shuffle=False
      ).as_numpy_iterator()
  )
  target = task.postprocess_fn(
      ex["targets_pretokenized"], example=ex, is_target=True
  )
  assert target.num_tokens == len(ex["targets"]) == 16
