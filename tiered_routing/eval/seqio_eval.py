"""SeqIO's own evaluation path: `seqio.Evaluator` with a model score_fn.

The per-language tasks register the score metrics of `lm_metrics`
(`score_metric_fns`, with `scored_target_postprocessor`), so a
`seqio.Evaluator` over a partition's mixture computes loss, perplexity and
bits per byte of every task from the per-example log-likelihoods of a
`score_fn` (T5X's `score_batch` contract: it gets the Evaluator's cached,
enumerated dataset of (index, model features) and returns
[(index, summed log-likelihood)]). No decoding is involved.

The score_fn here scores each example under a tier-1 inference mode of a
`routed_eval.RoutedScorer` ('oracle' by default: the example's own
partition). The Evaluator needs unpacked examples, so the numbers match the
fast packed path of the eval binary exactly when routing drops no token
(e.g. capacity_factor >= num_experts / top_k): packing changes the batch,
not the per-sequence computation.
"""

from collections.abc import Sequence

from absl import logging
import seqio
import tensorflow as tf

from tiered_routing.data import pipeline
from tiered_routing.eval import routed_eval
from tiered_routing.tier1 import languages

SEQIO_PREFIX = "seqio"
# Metrics of the score metric fns that are copied into the results.
_METRICS = ("loss", "perplexity", "bits_per_byte", "num_tokens", "num_bytes")


class EvaluatorFeatureConverter(pipeline.LanguageLMFeatureConverter):
  """The unpacked converter, accepting a length for `language_ids` too.

  seqio.Evaluator hands the converter a length for every output feature of
  the tasks; the per-token language ids always have the targets' length.
  """

  TASK_FEATURES = {
      **pipeline.LanguageLMFeatureConverter.TASK_FEATURES,
      pipeline.LANGUAGE_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }

  def __init__(self):
    super().__init__(pack=False)


def make_score_fn(routed: routed_eval.RoutedScorer, mode: str = "oracle"):
  """A seqio score_fn: each example's summed log-likelihood under `mode`."""
  if mode not in routed.config.modes:
    raise ValueError(
        f"mode {mode!r} is not evaluated; allowed: {routed.config.modes}"
    )

  def score_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes  # Rows are padded to the scorer's shape.
    out = []
    for index_B, batch in dataset.batch(routed.scorer.rows).as_numpy_iterator():
      _, scores = routed(batch)
      ll_B = scores[mode].log_likelihood[: len(index_B)]
      out.extend(zip(index_B.tolist(), ll_B.tolist()))
    return out

  return score_fn


def _language(task_dataset) -> str:
  """The language of a per-language task's (cached) examples."""
  for ex in task_dataset.take(1).as_numpy_iterator():
    return languages.CODES[int(ex[pipeline.LANGUAGE_IDS][0])]
  raise ValueError("a task has no examples to evaluate")


def evaluate(
    names: str | Sequence[str],
    length: int,
    score_fn,
    split: str = "validation",
    step: int | None = None,
) -> dict[str, float]:
  """Runs seqio.Evaluator on every task of `names` with `score_fn`.

  Returns:
    '{SEQIO_PREFIX}/{code}/{metric}' for the metrics of every evaluated task.
  """
  converter = EvaluatorFeatureConverter()
  names = [names] if isinstance(names, str) else list(names)
  out = {}
  for name in names:
    evaluator = seqio.Evaluator(
        mixture_or_task_name=name,
        feature_converter=converter,
        eval_split=split,
        sequence_length={"targets": length},
        async_compute_metrics=False,
    )
    if not evaluator.eval_tasks:
      raise ValueError(
          f"{name!r} has no task with split {split!r} and metric fns"
      )
    all_metrics, _ = evaluator.evaluate(
        compute_metrics=True, step=step, score_fn=score_fn
    )
    for task_name, task_metrics in all_metrics.result().items():
      code = _language(evaluator.cached_task_datasets[task_name])
      for metric in _METRICS:
        if metric in task_metrics:
          out[f"{SEQIO_PREFIX}/{code}/{metric}"] = float(task_metrics[metric])
    evaluator.close()
  logging.info("seqio.Evaluator: %d metrics", len(out))
  return out
