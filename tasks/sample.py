"""Tasks on the embedded UDHR-16 corpus: `tr.sample.{lang}_v1`.

Small enough to train and evaluate on a laptop CPU; the default source of the
quickstart, the trade-off preset and the tests.
"""

import seqio
import tensorflow as tf

from tasks import preprocessors
from tasks import vocab
from tiered_routing.data import corpora
from tiered_routing.data import seqio_names
from tiered_routing.eval import seqio_metrics
from tiered_routing.tier1 import languages

SOURCE = "sample"


def _dataset_fn(code: str):
  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # One small in-memory "file"; Task shuffles.
    text = list(corpora.split_paragraphs(code, split))
    return tf.data.Dataset.from_tensor_slices({"text": text})

  return dataset_fn


def register() -> None:
  """Registers one task per language (idempotent)."""
  for lang in languages.LANGUAGES:
    name = seqio_names.task_name(SOURCE, lang.code)
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(lang.code),
            splits=corpora.SPLITS,
            num_input_examples={
                s: len(corpora.split_paragraphs(lang.code, s))
                for s in corpora.SPLITS
            },
        ),
        preprocessors=preprocessors.lm_preprocessors(
            languages.language_id(lang.code)
        ),
        output_features=vocab.output_features(),
        # Score metrics (loss, perplexity, bits per byte) for seqio.Evaluator
        # with a score_fn; see tiered_routing.eval.seqio_eval.
        postprocess_fn=seqio_metrics.scored_target_postprocessor(
            vocab.get_vocabulary()
        ),
        metric_fns=seqio_metrics.score_metric_fns(vocab.get_vocabulary()),
    )


register()
