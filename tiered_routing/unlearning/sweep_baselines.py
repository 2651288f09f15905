"""The sweep's n-gram baselines, computed once and kept in the output dir.

Every language's unigram and bigram loss (`eval.ngram_baselines`), fitted
on its whole training split as the models read it (cut to the sweep's
sequence length) and scored on exactly the held-out rows the models are
scored on. They do not depend on the configuration or the seed, so a sweep
computes them once and a resumed sweep reads `baselines.json`.
"""

import json
import os
from typing import Callable

from tiered_routing.data import stream_cache
from tiered_routing.eval import ngram_baselines
from tiered_routing.tier1 import languages
from tiered_routing.train import atomic_file

Baselines = dict[str, dict[str, float]]


def compute(
    cache: stream_cache.DataCache,
    task_name: Callable[[str], str],
    split: str,
    vocab_size: int,
) -> Baselines:
  """{code: {'unigram_loss', 'bigram_loss', 'tokens'}} of every language."""
  rows = cache.validation_rows(
      {c: task_name(c) for c in languages.CODES}, split
  )
  out = {}
  for code in languages.CODES:
    baseline = ngram_baselines.NgramBaseline.fit(
        ngram_baselines.task_sequences(
            task_name(code), cache.sequence_length
        ),
        vocab_size,
    )
    out[code] = ngram_baselines.score_rows(baseline, rows[code])
  return out


def baselines(
    path: str,
    cache: stream_cache.DataCache,
    task_name: Callable[[str], str],
    split: str,
    vocab_size: int,
) -> Baselines:
  """The baselines saved at `path`, computed and saved first if absent."""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  out = compute(cache, task_name, split, vocab_size)
  atomic_file.write_text(path, json.dumps(out, indent=1) + "\n")
  return out
