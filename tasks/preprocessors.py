"""Language-modelling preprocessors shared by every source.

A document becomes one or more `targets` chunks of at most L-1 tokens (room
for EOS), each with a per-token `language_ids` feature. The language id is
per token, not per example, so that it survives SeqIO packing, which
concatenates examples feature by feature (the evaluator and the routing
statistics read it per token; tiered_routing.data.pipeline).
"""

import functools
import json

import seqio
import tensorflow as tf

LANGUAGE_IDS = "language_ids"


def split_to_length(
    dataset: tf.data.Dataset, sequence_length=None
) -> tf.data.Dataset:
  """Splits tokenized `targets` into chunks of at most L-1 tokens.

  Long mC4 documents would otherwise be truncated to their first L tokens,
  wasting most of the text; splitting keeps every token (as T5's
  `split_tokens` does). Other features are copied to every chunk. SeqIO's
  packer fills rows greedily in order, so only chunks shorter than a row
  (short documents and remainders) share rows with their neighbours.

  Args:
    dataset: examples with a rank-1 int `targets`.
    sequence_length: {"targets": L}; None (e.g. raw inspection) leaves
        examples whole.
  """
  if not sequence_length or sequence_length.get("targets") is None:
    return dataset
  max_len = sequence_length["targets"] - 1
  if max_len < 1:
    raise ValueError(
        f"targets length must be >= 2 (one token + EOS), got "
        f"{sequence_length['targets']!r}"
    )

  def chunks(ex):
    tokens = ex["targets"]
    starts = tf.range(0, tf.size(tokens), max_len)

    def one(start):
      out = dict(ex)
      out["targets"] = tokens[start : start + max_len]
      return out

    return tf.data.Dataset.from_tensor_slices(starts).map(one)

  return dataset.flat_map(chunks)


def add_language_ids(
    dataset: tf.data.Dataset, language_id: int
) -> tf.data.Dataset:
  """Adds int32 `language_ids` with the shape of `targets`, all `language_id`.

  Must run after EOS is appended so the two features have equal lengths.
  """

  @seqio.map_over_dataset
  def add(ex):
    ex = dict(ex)
    ex[LANGUAGE_IDS] = tf.fill(
        tf.shape(ex["targets"]), tf.constant(language_id, tf.int32)
    )
    return ex

  return add(dataset)


def lm_preprocessors(language_id: int, text_key: str = "text"):
  """The preprocessor chain of every per-language LM task."""

  def with_language(dataset):
    return add_language_ids(dataset, language_id)

  return [
      functools.partial(
          seqio.preprocessors.rekey, key_map={"targets": text_key}
      ),
      seqio.preprocessors.tokenize,
      split_to_length,
      seqio.preprocessors.append_eos_after_trim,
      with_language,
  ]


def _json_text(line: bytes, source: bytes) -> tuple[bytes, bytes]:
  """(text, "") of a c4 JSON line, or (b"", what is wrong and where).

  It never raises: an exception inside `tf.numpy_function` in a parallel
  tf.data pipeline was printed once per thread and then hung the input
  pipeline; a failed TF assertion ends it cleanly."""
  try:
    record = json.loads(line)
    return record["text"].encode("utf-8"), b""
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    where = source.decode("utf-8", errors="replace")
    return b"", (
        f"{where}: not a JSON object with a 'text' string "
        f"({type(e).__name__}: {e})").encode("utf-8")


@seqio.map_over_dataset
def parse_c4_json(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Parses one line of an allenai/c4 json.gz shard into {"text": ...}.

  Each line is a JSON object with `text`, `timestamp` and `url`; only the
  text is kept. TF has no JSON op for arbitrary objects, so Python parses
  it. `example` is {"line", "source"} (`mc4.read_gzip_lines`); a bad line
  stops the pipeline with an error naming its file and line number.
  """
  text, error = tf.numpy_function(
      _json_text, [example["line"], example["source"]],
      [tf.string, tf.string], stateful=False)
  check = tf.debugging.Assert(tf.equal(error, ""), [error])
  with tf.control_dependencies([check]):
    text = tf.identity(text)
  text.set_shape([])
  return {"text": text}
