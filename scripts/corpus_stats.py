r"""Per-language size of an embedded corpus's splits and its n-gram baselines.

  python scripts/corpus_stats.py --source=debian16 --sequence_length=128

Prints a Markdown table: lines and UTF-8 bytes of every split, training
tokens (the source's SentencePiece model, sequences cut to the given length
as the models read them), and the unigram and bigram baselines of
`tiered_routing.eval.ngram_baselines` (fitted on the train split, scored on
--split) in nats per token: the floor a trained model has to beat.
"""

from absl import app
from absl import flags
from absl import logging
import numpy as np

import tasks  # pylint: disable=unused-import  (registers the tasks)
from tiered_routing.data import corpora
from tiered_routing.data import seqio_names
from tiered_routing.eval import ngram_baselines
from tiered_routing.tier1 import languages

_SOURCE = flags.DEFINE_enum(
    "source", "debian16", [c.source for c in corpora.CORPORA], "Corpus."
)
_LENGTH = flags.DEFINE_integer("sequence_length", 128, "Tokens per sequence.")
_SPLIT = flags.DEFINE_string("split", "test", "Split the baselines score.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "The model's vocabulary.")


def _row(corpus, code, length, split):
  task = seqio_names.task_name(corpus.source, code)
  train = list(ngram_baselines.task_sequences(task, length))
  held_out = list(ngram_baselines.task_sequences(task, length, split=split))
  baseline = ngram_baselines.NgramBaseline.fit(train, _VOCAB.value)
  tokens = np.concatenate(held_out)
  contexts = np.concatenate([np.concatenate([[0], s[:-1]]) for s in held_out])
  cells = [code]
  for s in corpus.splits:
    lines = corpus.split_lines(code, s)
    cells += [f"{len(lines):,}", f"{sum(len(x.encode()) for x in lines):,}"]
  cells += [
      f"{sum(len(s) for s in train):,}",
      f"{baseline.unigram_nll(tokens).mean():.3f}",
      f"{baseline.bigram_nll(contexts, tokens).mean():.3f}",
  ]
  return cells


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  corpus = corpora.of_source(_SOURCE.value)
  header = ["lang"]
  for s in corpus.splits:
    header += [f"{s} lines", f"{s} bytes"]
  header += ["train tokens", f"unigram ({_SPLIT.value})",
             f"bigram ({_SPLIT.value})"]
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for code in languages.CODES:
    print("| " + " | ".join(_row(corpus, code, _LENGTH.value, _SPLIT.value))
          + " |")


if __name__ == "__main__":
  app.run(main)
