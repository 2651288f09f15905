r"""Trains a SentencePiece vocabulary on an embedded corpus or any SeqIO task.

It rebuilds a vocabulary that ships with the package, trained on the train
split of an embedded corpus (udhr16: the sample; debian16), to compare with
the shipped one:

  python scripts/train_vocab.py --corpus=debian16 --output=/tmp/debian16.model

--output is required and an existing file is replaced only with
--overwrite, so the shipped model is never replaced by accident.

On any registered task or mixture (e.g. mC4 with a TFDS data dir), reading
the raw `text` field of up to --max_examples examples:

  python scripts/train_vocab.py --mixture_or_task=tr.mc4.all_v1 \
      --module_import=tasks --max_examples=2000000 --vocab_size=64000 \
      --output=/tmp/mc4_spm.model

Ids follow the T5/SeqIO convention (pad=0, eos=1, unk=2, no bos), and byte
fallback keeps every string encodable, which matters for 16 scripts.
"""

import importlib
import itertools
import os
import pathlib
import shutil
import tempfile

from absl import app
from absl import flags
import sentencepiece as spm

from tiered_routing.data import corpora
from tiered_routing.tier1 import languages

_CORPUS = flags.DEFINE_enum(
    "corpus",
    corpora.UDHR16.name,
    [c.name for c in corpora.CORPORA],
    "Embedded corpus to train on (without --mixture_or_task).",
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write the .model file (required).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace --output if it exists (e.g. the shipped "
    "model of a corpus whose text changed).")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size",
    4096,
    "Vocabulary size (the udhr16 corpus supports at most ~7000).",
)
_TASK = flags.DEFINE_string(
    "mixture_or_task",
    None,
    "SeqIO task or mixture to read `text` from; default: the sample corpus.",
)
_MODULES = flags.DEFINE_multi_string(
    "module_import", ["tasks"], "Modules that register the task."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", 1_000_000, "Examples to read from the task."
)
_THREADS = flags.DEFINE_integer(
    "num_threads",
    1,
    "Trainer threads; 1 makes the model byte-for-byte reproducible.",
)
_COVERAGE = flags.DEFINE_float(
    "character_coverage", 0.9995, "SentencePiece character coverage."
)


def corpus_text(corpus: corpora.EmbeddedCorpus):
  """Train-split lines of all 16 languages, interleaved."""
  per_lang = [corpus.split_lines(c, "train") for c in languages.CODES]
  for group in itertools.zip_longest(*per_lang):
    yield from (p for p in group if p)


def task_text(name: str, max_examples: int):
  """Raw `text` of a SeqIO task or mixture's train split (no tokenizing)."""
  import seqio  # pylint: disable=g-import-not-at-top

  for module in _MODULES.value:
    importlib.import_module(module)
  provider = seqio.get_mixture_or_task(name)
  tasks = getattr(provider, "tasks", [provider])
  per_task = max(1, max_examples // len(tasks))
  for task in tasks:
    ds = task.source.get_dataset(split="train", shuffle=False)
    for ex in ds.take(per_task).as_numpy_iterator():
      yield ex["text"].decode("utf-8")


def train(
    sentences,
    output: str,
    vocab_size: int,
    coverage: float,
    num_threads: int = 1,
) -> None:
  """Trains and atomically writes `output` (never a half-written model)."""
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=coverage,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        input_sentence_size=10_000_000,
        max_sentence_length=1 << 14,  # debian16 has lines over 4 KB.
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=1,
    )
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_suffix(".model.tmp")
    shutil.copyfile(prefix + ".model", staged)
    os.replace(staged, out)


def main(argv):
  del argv
  corpus = next(c for c in corpora.CORPORA if c.name == _CORPUS.value)
  output = _OUTPUT.value
  if output is None:
    raise app.UsageError(
        f"--output is required, e.g. --output=/tmp/{corpus.name}.model "
        f"(the shipped model is {corpus.vocab_path()}).")
  if os.path.exists(output) and not _OVERWRITE.value:
    raise app.UsageError(
        f"--output={output} exists; pass --overwrite to replace it.")
  if _TASK.value:
    sentences = task_text(_TASK.value, _MAX_EXAMPLES.value)
  else:
    sentences = corpus_text(corpus)
  train(
      sentences,
      output,
      _VOCAB_SIZE.value,
      _COVERAGE.value,
      _THREADS.value,
  )
  print(f"wrote {output} ({_VOCAB_SIZE.value} pieces)")


if __name__ == "__main__":
  app.run(main)
