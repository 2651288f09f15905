"""Tasks on the embedded corpora: `tr.{sample,debian16}.{lang}_v1`.

`sample` is UDHR-16 (a demo small enough for a laptop: the quickstart, the
sample preset and most tests); `debian16` is 22.9 MB of real translated
Debian text (the `cpu` preset). Splits and caveats:
`tiered_routing.data.corpora`. Each source is tokenized with the
SentencePiece model trained on its own train split (`tasks.vocab`).
"""

import seqio
import tensorflow as tf

from tasks import preprocessors
from tasks import vocab
from tiered_routing.data import corpora
from tiered_routing.data import seqio_names
from tiered_routing.eval import seqio_metrics
from tiered_routing.tier1 import languages

SOURCES = tuple(c.source for c in corpora.CORPORA)


def _dataset_fn(corpus: corpora.EmbeddedCorpus, code: str):
  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # One in-memory "file"; the Task shuffles.
    text = list(corpus.split_lines(code, split))
    return tf.data.Dataset.from_tensor_slices({"text": text})

  return dataset_fn


def register(source: str) -> None:
  """Registers one task per language of an embedded source (idempotent)."""
  corpus = corpora.of_source(source)
  vocabulary = vocab.get_vocabulary(source)
  for lang in languages.LANGUAGES:
    name = seqio_names.task_name(source, lang.code)
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(corpus, lang.code),
            splits=corpus.splits,
            num_input_examples={
                s: len(corpus.split_lines(lang.code, s)) for s in corpus.splits
            },
        ),
        preprocessors=preprocessors.lm_preprocessors(
            languages.language_id(lang.code)
        ),
        output_features=vocab.output_features(source),
        # Score metrics (loss, perplexity, bits per byte) for seqio.Evaluator
        # with a score_fn; see tiered_routing.eval.seqio_eval.
        postprocess_fn=seqio_metrics.scored_target_postprocessor(vocabulary),
        metric_fns=seqio_metrics.score_metric_fns(vocabulary),
    )


for _source in SOURCES:
  register(_source)
