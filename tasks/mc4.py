"""mC4 tasks for the 16 languages, from two sources.

* `tr.mc4.{lang}_v1`: TFDS `c4/multilingual:3.1.0`, whose splits are named by
  language (`hi`, `hi-validation`). The TFDS data dir is TFDS's own setting
  ($TFDS_DATA_DIR or `seqio.set_tfds_data_dir_override`).
* `tr.mc4_json.{lang}_v1`: the allenai/c4 `multilingual/` json.gz shards
  (`c4-{lang}.tfrecord-*.json.gz`, `c4-{lang}-validation.tfrecord-*.json.gz`),
  read from the directory in $TR_MC4_JSON_DIR (local path or gs://), resolved
  when a dataset is built, so the tasks can be registered before it is set.
"""

import os

import seqio
import tensorflow as tf

from tasks import preprocessors
from tasks import vocab
from tiered_routing.data import seqio_names
from tiered_routing.eval import seqio_metrics
from tiered_routing.tier1 import languages

TFDS_NAME = "c4/multilingual:3.1.0"
JSON_DIR_ENV_VAR = "TR_MC4_JSON_DIR"


def tfds_splits(code: str) -> dict[str, str]:
  return {"train": code, "validation": f"{code}-validation"}


def json_file_patterns(code: str) -> dict[str, str]:
  """Split -> file pattern, relative to the json directory."""
  return {
      "train": f"c4-{code}.tfrecord-*.json.gz",
      "validation": f"c4-{code}-validation.tfrecord-*.json.gz",
  }


def read_gzip_lines(path: tf.Tensor) -> tf.data.Dataset:
  """{"line", "source": "<file>:<line number>"} of one json.gz shard."""
  lines = tf.data.TextLineDataset(path, compression_type="GZIP")
  return lines.enumerate(start=1).map(
      lambda i, line: {
          "line": line,
          "source": tf.strings.join([path, ":", tf.strings.as_string(i)]),
      })


def check_gzip_shards(paths, directory: str, pattern: str) -> None:
  """Raises if there is no shard, or one is not gzip (named the way
  TextLineDataset's "inflate() failed" never names it)."""
  if not paths:
    raise FileNotFoundError(
        f"No mC4 json shards match {pattern!r} in {directory} "
        f"(${JSON_DIR_ENV_VAR}).")
  for path in paths:
    with tf.io.gfile.GFile(path, "rb") as f:
      if f.read(2) != b"\x1f\x8b":
        raise ValueError(
            f"{path} is not a gzip file, as a c4 *.json.gz shard must be.")


class C4JsonDataSource(seqio.FileDataSource):
  """json.gz shards under a directory chosen at dataset-build time."""

  def __init__(self, code: str, data_dir: str | None = None):
    self._data_dir = data_dir
    super().__init__(
        read_file_fn=read_gzip_lines,
        split_to_filepattern=json_file_patterns(code),
    )

  def data_dir(self) -> str:
    data_dir = self._data_dir or os.environ.get(JSON_DIR_ENV_VAR)
    if not data_dir:
      raise ValueError(
          f"No mC4 json directory: set ${JSON_DIR_ENV_VAR} to the "
          "directory holding c4-{lang}.tfrecord-*.json.gz shards"
      )
    return data_dir

  def list_shards(self, split: str):
    directory = self.data_dir()
    pattern = self._split_to_filepattern[split]
    shards = seqio.utils.list_files(os.path.join(directory, pattern))
    check_gzip_shards(shards, directory, pattern)
    return shards


def _eval_args(source: str) -> dict:
  """Score metrics for seqio.Evaluator (see tiered_routing.eval.seqio_eval)."""
  vocabulary = vocab.get_vocabulary(source)
  return {
      "postprocess_fn": seqio_metrics.scored_target_postprocessor(vocabulary),
      "metric_fns": seqio_metrics.score_metric_fns(vocabulary),
  }


def register() -> None:
  """Registers both mC4 sources for all 16 languages (idempotent)."""
  registered = set(seqio.TaskRegistry.names())
  for lang in languages.LANGUAGES:
    lang_id = languages.language_id(lang.code)
    name = seqio_names.task_name("mc4", lang.code)
    if name not in registered:
      seqio.TaskRegistry.add(
          name,
          source=seqio.TfdsDataSource(TFDS_NAME, splits=tfds_splits(lang.code)),
          preprocessors=preprocessors.lm_preprocessors(lang_id),
          output_features=vocab.output_features("mc4"),
          **_eval_args("mc4"),
      )
    name = seqio_names.task_name("mc4_json", lang.code)
    if name not in registered:
      seqio.TaskRegistry.add(
          name,
          source=C4JsonDataSource(lang.code),
          preprocessors=[
              preprocessors.parse_c4_json,
              *preprocessors.lm_preprocessors(lang_id),
          ],
          output_features=vocab.output_features("mc4_json"),
          **_eval_args("mc4_json"),
      )


register()
