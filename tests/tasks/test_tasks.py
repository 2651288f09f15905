"""SeqIO tasks, mixtures, the feature converter and the input pipeline."""

import gzip
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks  # pylint: disable=unused-import
from tasks import mc4
from tasks import mixtures
from tiered_routing import sharding
from tiered_routing.data import corpora
from tiered_routing.data import host_shards
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

REPO = pathlib.Path(__file__).resolve().parents[2]
EOS = 1


def test_sample_split_is_fixed_disjoint_and_complete():
  for code in languages.CODES:
    train = corpora.UDHR16.split_lines(code, "train")
    val = corpora.UDHR16.split_lines(code, "validation")
    assert set(train).isdisjoint(val)
    assert len(train) + len(val) == len(corpora.UDHR16.lines(code))
    assert 9 <= len(val) <= 10
  # Every 6th paragraph, counting from 1, is held out.
  assert (
      corpora.UDHR16.split_lines("en", "validation")[0]
      == corpora.UDHR16.lines("en")[5]
  )
  assert corpora.UDHR16.lines("en")[5].startswith("Whereas the peoples")
  with pytest.raises(ValueError, match="'test'"):
    corpora.UDHR16.split_lines("en", "test")


@pytest.mark.parametrize("source", seqio_names.SOURCES)
def test_all_tasks_and_default_mixtures_are_registered(source):
  for code in languages.CODES:
    assert seqio_names.task_name(source, code) in seqio.TaskRegistry.names()
  mix = seqio.get_mixture_or_task(f"tr.{source}.all_v1")
  assert len(mix.tasks) == 16
  for scheme in mixtures.DEFAULT_SCHEMES:
    for p in range(scheme.num_partitions):
      name = seqio_names.partition_name(source, scheme.name, p)
      members = {t.name for t in seqio.get_mixture_or_task(name).tasks}
      assert members == {
          seqio_names.task_name(source, c) for c in scheme.languages_of(p)
      }


@pytest.mark.parametrize("code", languages.CODES)
def test_sample_task_yields_eos_terminated_chunks_with_language_ids(code):
  task = seqio.get_mixture_or_task(seqio_names.task_name("sample", code))
  ds = task.get_dataset({"targets": 32}, split="validation", shuffle=False)
  examples = list(ds.as_numpy_iterator())
  assert examples
  for ex in examples:
    assert ex["targets"].dtype == np.int32 and ex["targets"].ndim == 1
    assert 1 <= len(ex["targets"]) <= 32
    np.testing.assert_array_equal(
        ex["language_ids"],
        np.full_like(ex["targets"], languages.language_id(code)),
    )
  # Splitting keeps every token: the chunks re-join to the paragraphs.
  vocab = task.output_features["targets"].vocabulary
  joined = np.concatenate([ex["targets"][:-1] for ex in examples])
  expected = np.concatenate(
      [vocab.encode(p) for p in corpora.UDHR16.split_lines(code, "validation")]
  )
  np.testing.assert_array_equal(joined, expected)
  assert all(ex["targets"][-1] == EOS for ex in examples)


def test_feature_converter_packs_ids_golden():
  ds = tf.data.Dataset.from_generator(
      lambda: iter(
          [
              {"targets": [3, 9, 1], "language_ids": [0, 0, 0]},
              {"targets": [4, 1], "language_ids": [13, 13]},
          ]
      ),
      output_signature={
          "targets": tf.TensorSpec([None], tf.int32),
          "language_ids": tf.TensorSpec([None], tf.int32),
      },
  )
  converter = pipeline.LanguageLMFeatureConverter()
  ex = next(converter(ds, {"targets": 6}).as_numpy_iterator())
  expected = {
      "decoder_target_tokens": [3, 9, 1, 4, 1, 0],
      "decoder_input_tokens": [0, 3, 9, 0, 4, 0],
      "decoder_loss_weights": [1, 1, 1, 1, 1, 0],
      # Id 0 (hi, partition 0) must not be mistaken for padding by packing.
      "decoder_language_ids": [0, 0, 0, 13, 13, 0],
      "decoder_segment_ids": [1, 1, 1, 2, 2, 0],
      "decoder_positions": [0, 1, 2, 0, 1, 0],
  }
  assert set(ex) == set(expected) == set(pipeline.MODEL_FEATURES)
  for key, value in expected.items():
    np.testing.assert_array_equal(ex[key], value, err_msg=key)
  # Tier 1 is a lookup from the language ids: hi -> 0, en -> 3.
  table = schemes.family(4).language_to_partition_table()
  np.testing.assert_array_equal(
      table[ex["decoder_language_ids"]][ex["decoder_loss_weights"] > 0],
      [0, 0, 0, 3, 3],
  )


def test_feature_converter_requires_language_ids():
  ds = tf.data.Dataset.from_tensors({"targets": tf.constant([3, 1])})
  converter = pipeline.LanguageLMFeatureConverter()
  with pytest.raises(ValueError, match="language_ids"):
    converter(ds, {"targets": 4})


def test_language_ids_survive_packing_in_the_all_language_mixture():
  # Rows longer than most paragraphs, so several sequences share a row.
  ds = pipeline.get_dataset(
      "tr.sample.all_v1", sequence_length=256, batch_size=16, seed=3
  )
  batch = next(pipeline.batch_iterator(ds))
  used = batch["decoder_loss_weights"] > 0
  mixed_rows = 0
  for row in range(16):
    segs = batch["decoder_segment_ids"][row]
    langs = batch["decoder_language_ids"][row]
    per_segment = [set(langs[segs == s]) for s in set(segs[used[row]])]
    assert all(len(s) == 1 for s in per_segment)  # one language a sequence
    mixed_rows += len(set().union(*per_segment)) > 1
  assert mixed_rows > 0  # packing really did mix languages in a row


def test_partitioned_batches_keep_each_partition_in_its_block():
  scheme = schemes.family(4)
  names = seqio_names.partition_mixture_names("sample", scheme)
  ds = pipeline.partitioned_dataset(
      names, global_batch_size=8, sequence_length=32
  )
  table = scheme.language_to_partition_table()
  for batch in pipeline.batch_iterator(ds.take(3)):
    assert batch["decoder_target_tokens"].shape == (4, 2, 32)
    for p in range(4):
      used = batch["decoder_loss_weights"][p] > 0
      assert set(table[batch["decoder_language_ids"][p][used]]) == {p}
      langs = {
          languages.CODES[i] for i in batch["decoder_language_ids"][p][used]
      }
      assert langs <= set(scheme.languages_of(p))


def test_host_blocks_tile_the_global_batch():
  """Row shard j of partition p is the same whoever reads it: two hosts'
  blocks (partition 1's row shard 0, and its row shard 1) are the slices
  of the batch one process reads with the same number of row shards."""
  scheme = schemes.family(2)
  names = seqio_names.partition_mixture_names("sample", scheme)
  shape = (2, 4, 16)

  def first_batch(partitions, shards, count=2):
    block = host_shards.HostBlock(partitions, shards, count, shape)
    ds = pipeline.partitioned_dataset(
        names, global_batch_size=8, block=block, sequence_length=16, seed=3
    )
    return next(pipeline.batch_iterator(ds))

  whole = first_batch((0, 1), (0, 1))
  first, second = first_batch((1,), (0,)), first_batch((1,), (1,))
  for key, value in whole.items():
    assert value.shape == (2, 4, 16)
    np.testing.assert_array_equal(first[key], value[1:, :2], key)
    np.testing.assert_array_equal(second[key], value[1:, 2:], key)
  # One row shard reads other rows than two: the order depends on it.
  assert not np.array_equal(
      first_batch((0, 1), (0,), count=1)["decoder_target_tokens"],
      whole["decoder_target_tokens"])


def test_host_block_of_one_process_is_the_whole_batch():
  mesh = sharding.make_mesh(sharding.MeshConfig(partition=2))
  block = host_shards.host_block(mesh, (4, 8, 16))
  assert block == host_shards.whole_batch((4, 8, 16))
  assert host_shards.host_block(mesh, (4, 8, 16), 4).row_shards == (
      0, 1, 2, 3)
  with pytest.raises(ValueError, match="num_row_shards=3 does not divide"):
    host_shards.host_block(mesh, (4, 8, 16), 3)


def test_data_order_is_a_function_of_step():
  scheme = schemes.family(2)
  names = seqio_names.partition_mixture_names("sample", scheme)

  def make():
    return pipeline.partitioned_dataset(
        names, global_batch_size=4, sequence_length=16, seed=11
    )

  uninterrupted = list(pipeline.batch_iterator(make().take(5)))
  resumed = next(pipeline.batch_iterator(make(), start_step=4))
  for key, value in uninterrupted[4].items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_temperature_sampling_rates():
  name = seqio_names.all_languages_mixture("sample", temperature=2.0)
  assert name == "tr.sample.all_t2_v1"
  mix = seqio.get_mixture_or_task(name)
  for task in mix.tasks:
    n = task.num_input_examples("train")
    assert mix.get_rate(task) == pytest.approx(n**0.5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: seqio_names.all_languages_mixture("wiki"), "'wiki'"),
        (
            lambda: seqio_names.all_languages_mixture("sample", temperature=0),
            "0",
        ),
        (
            lambda: pipeline.partitioned_dataset(
                ["tr.sample.hi_v1"] * 4, global_batch_size=6, sequence_length=8
            ),
            "global_batch_size=6",
        ),
        (
            lambda: pipeline.get_dataset(
                "tr.sample.hi_v1", sequence_length=1, batch_size=2
            ),
            "sequence_length=1",
        ),
    ],
)
def test_bad_input_raises_naming_the_value(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_mc4_tfds_tasks_under_mock_data():
  # Under the mock TFDS knows no split sizes (no dataset_info.json), which
  # SeqIO asks for when building a dataset; report the mock's size.
  with tfds.testing.mock_data(num_examples=6), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", lambda self, split: 6
  ):
    task = seqio.get_mixture_or_task("tr.mc4.kk_v1")
    ex = next(
        task.get_dataset(
            {"targets": 16}, split="validation", shuffle=False
        ).as_numpy_iterator()
    )
    assert set(ex["language_ids"]) == {languages.language_id("kk")}
    ds = pipeline.get_dataset("tr.mc4.all_v1", sequence_length=16, batch_size=4)
    batch = next(pipeline.batch_iterator(ds))
  assert batch["decoder_language_ids"].shape == (4, 16)
  assert batch["decoder_target_tokens"].dtype == np.int32


def test_mc4_json_tasks_read_gzip_shards(tmp_path, monkeypatch):
  docs = [
      "Tout être humain a droit à la vie.",
      "Nul ne sera tenu en " "esclavage.",
  ]
  for split in ("", "-validation"):
    path = tmp_path / f"c4-de{split}.tfrecord-00000-of-00001.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
      for doc in docs:
        f.write(json.dumps({"text": doc, "url": "x", "timestamp": "t"}) + "\n")
  task = seqio.get_mixture_or_task("tr.mc4_json.de_v1")
  monkeypatch.delenv(mc4.JSON_DIR_ENV_VAR, raising=False)
  with pytest.raises(ValueError, match=mc4.JSON_DIR_ENV_VAR):
    task.get_dataset({"targets": 64}, split="validation")
  monkeypatch.setenv(mc4.JSON_DIR_ENV_VAR, str(tmp_path))
  examples = list(
      task.get_dataset(
          {"targets": 64}, split="validation", shuffle=False
      ).as_numpy_iterator()
  )
  vocab = task.output_features["targets"].vocabulary
  assert [vocab.decode(ex["targets"].tolist()) for ex in examples] == docs


@pytest.mark.heavy
@pytest.mark.parametrize("corpus", corpora.CORPORA, ids=lambda c: c.name)
def test_train_vocab_rebuilds_the_shipped_vocabulary(corpus, tmp_path):
  out = tmp_path / "spm.model"
  subprocess.run(
      [
          sys.executable,
          str(REPO / "scripts/train_vocab.py"),
          f"--corpus={corpus.name}",
          f"--output={out}",
      ],
      check=True,
      capture_output=True,
  )
  rebuilt = spm.SentencePieceProcessor(model_file=str(out))
  shipped = spm.SentencePieceProcessor(model_file=corpus.vocab_path())
  assert rebuilt.get_piece_size() == shipped.get_piece_size() == 4096
  for i in range(0, 4096, 7):
    assert rebuilt.id_to_piece(i) == shipped.id_to_piece(i)
    assert rebuilt.get_score(i) == shipped.get_score(i)
  assert (shipped.pad_id(), shipped.eos_id(), shipped.unk_id()) == (0, 1, 2)


@pytest.mark.parametrize("split", ["validation", "test"])
@pytest.mark.parametrize("code", ["ur", "zh", "en"])
def test_debian16_tasks_tokenize_their_split_with_their_own_vocabulary(
    code, split
):
  task = seqio.get_mixture_or_task(seqio_names.task_name("debian16", code))
  vocab = task.output_features["targets"].vocabulary
  assert vocab.sentencepiece_model_file == corpora.DEBIAN16.vocab_path()
  ds = task.get_dataset({"targets": 128}, split=split, shuffle=False)
  joined = np.concatenate(
      [ex["targets"][:-1] for ex in ds.as_numpy_iterator()]
  )
  lines = corpora.DEBIAN16.split_lines(code, split)
  expected = np.concatenate([vocab.encode(line) for line in lines])
  # The TF tokenizer (tensorflow-text) and the Python one may break a tie
  # between equal-score segmentations differently (seen: 2 swapped pieces
  # in 69k); the text and the token count must agree exactly.
  assert joined.shape == expected.shape
  assert (joined != expected).mean() < 1e-3
  assert vocab.decode(joined.tolist()) == vocab.decode(expected.tolist())


def test_corpus_stats_script_prints_every_language_with_baselines():
  out = subprocess.run(
      [
          sys.executable,
          str(REPO / "scripts/corpus_stats.py"),
          "--source=sample",
          "--sequence_length=64",
          "--split=validation",
      ],
      check=True,
      capture_output=True,
      text=True,
  ).stdout.splitlines()
  header = [c.strip() for c in out[0].strip("|").split("|")]
  assert header[-2:] == ["unigram (validation)", "bigram (validation)"]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in out[2:]]
  assert [r[0] for r in rows] == list(languages.CODES)
  ur = dict(zip(header, rows[languages.language_id("ur")]))
  lines = len(corpora.UDHR16.split_lines("ur", "train"))
  assert ur["train lines"] == f"{lines:,}"
  # The bigram model conditions on more: it scores the held-out text better.
  assert 0 < float(ur["bigram (validation)"]) < float(
      ur["unigram (validation)"]
  )


def _shards(directory, lines_or_bytes):
  for split in ("", "-validation"):
    path = directory / f"c4-en{split}.tfrecord-00000-of-00001.json.gz"
    if isinstance(lines_or_bytes, bytes):
      path.write_bytes(lines_or_bytes)
    else:
      with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines_or_bytes) + "\n")


@pytest.mark.parametrize("case", ["bad_line", "not_gzip", "no_shards"])
def test_mc4_json_bad_input_fails_promptly_naming_the_file(tmp_path, case):
  """A bad 4th line used to print JSONDecodeError per thread, without the
  file, and then hang at 0% CPU; a non-gzip shard and an empty directory
  did not name the file or the directory."""
  good = [json.dumps({"text": f"line {i} " * 20}) for i in range(40)]
  shard = tmp_path / "c4-en.tfrecord-00000-of-00001.json.gz"
  if case == "bad_line":
    _shards(tmp_path, good[:3] + ['{"text": "unterminated'] + good[3:])
    expected = f"Reading the data failed: {shard}:4: not a JSON object"
  elif case == "not_gzip":
    _shards(tmp_path, b'{"text": "plain"}\n')
    expected = f"{shard} is not a gzip file"
  else:
    expected = (f"No mC4 json shards match 'c4-en.tfrecord-*.json.gz' in "
                f"{tmp_path}")
  # The command: the train binary on one mc4_json task.
  proc = subprocess.run(
      [sys.executable, "-m", "tiered_routing.train",
       "--gin_file=gin/quickstart.gin", "--gin.NUM_PARTITIONS=1",
       "--gin.MIXTURE_OR_TASK_NAME='tr.mc4_json.en_v1'",
       f"--gin.MODEL_DIR='{tmp_path / 'run'}'"],
      cwd=REPO, capture_output=True, text=True, timeout=240,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           mc4.JSON_DIR_ENV_VAR: str(tmp_path)})
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"error: {expected}" in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.count("JSONDecodeError") <= 1


def test_train_vocab_never_replaces_a_model_by_accident(tmp_path):
  """Run without flags, as an older README said, it overwrote the shipped
  vocabulary inside the package."""
  script = str(REPO / "scripts/train_vocab.py")
  bare = subprocess.run([sys.executable, script], capture_output=True,
                        text=True)
  assert bare.returncode != 0 and "--output is required" in bare.stderr
  existing = tmp_path / "spm.model"
  existing.write_bytes(b"keep me")
  again = subprocess.run([sys.executable, script, f"--output={existing}"],
                         capture_output=True, text=True)
  assert again.returncode != 0 and "pass --overwrite" in again.stderr
  assert existing.read_bytes() == b"keep me"


def test_list_tasks_prints_the_registered_names():
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts/list_tasks.py"),
       r"--pattern=debian16\.(ur_v1|all_v1|family2)"],
      capture_output=True, text=True, check=True)
  assert proc.stdout.splitlines() == [
      "Tasks (1):", "  tr.debian16.ur_v1",
      "Mixtures (3):", "  tr.debian16.all_v1  (16 tasks)",
      "  tr.debian16.family2.p0_v1  (8 tasks)",
      "  tr.debian16.family2.p1_v1  (8 tasks)",
  ]
  bad = subprocess.run(
      [sys.executable, str(REPO / "scripts/list_tasks.py"), "--pattern=("],
      capture_output=True, text=True)
  assert bad.returncode == 1 and "is not a regex" in bad.stderr


def test_mc4_json_mixtures_are_rated_by_shard_size(tmp_path, monkeypatch):
  """A FileDataSource has no example count: seqio's rate raised TypeError
  ('NoneType' *= float) for every mc4_json mixture. The rate is now the
  training shards' bytes^(1/T); sources with counts keep seqio's rate."""
  for code, docs in (("en", 40), ("de", 10)):
    for split in ("", "-validation"):
      path = tmp_path / f"c4-{code}{split}.tfrecord-00000-of-00001.json.gz"
      with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(docs):
          f.write(json.dumps({"text": f"{code} document {i} " * 5}) + "\n")
  monkeypatch.setenv(mc4.JSON_DIR_ENV_VAR, str(tmp_path))
  name = seqio_names.register_mixture(
      "tr.mc4_json.test_en_de_v1",
      [seqio_names.task_name("mc4_json", c) for c in ("en", "de")],
  )
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  size = lambda c: os.path.getsize(
      tmp_path / f"c4-{c}.tfrecord-00000-of-00001.json.gz")
  t = seqio_names.DEFAULT_TEMPERATURE
  assert rates["tr.mc4_json.en_v1"] == pytest.approx(size("en") ** (1 / t))
  assert rates["tr.mc4_json.de_v1"] == pytest.approx(size("de") ** (1 / t))
  ds = pipeline.get_dataset(name, sequence_length=16, batch_size=2)
  assert next(pipeline.batch_iterator(ds))["decoder_target_tokens"].shape == (
      2, 16)
  sample = seqio.get_mixture_or_task("tr.sample.all_v1")
  task = sample.tasks[0]
  assert sample.get_rate(task) == pytest.approx(
      seqio.mixing_rate_num_examples(task, temperature=t))
