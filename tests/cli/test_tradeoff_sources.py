"""The main job on the mC4 sources, without downloading anything.

`mc4_json` reads allenai/c4-style json.gz shards this test writes for all 16
languages; `mc4` reads TFDS `c4/multilingual` under
`tfds.testing.mock_data` (random text of the real feature spec). Each runs
the trade-off sweep (`sweep.run_sweep`, in this process, so the TFDS mock
applies) on a tiny family2_none model: train, reference, exact retrain and
GA, with the report files written; the mc4_json run also removes ur and
then de in sequence (`sequential_removals`, through the sweep's units). The `sample` and `debian16` sources run
through the same job in test_tradeoff.py and the README's commands.
"""

import csv
import gzip
import json
from unittest import mock

import pytest
import seqio
import tensorflow_datasets as tfds

from tasks import mc4  # Registers every task.
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.train import steps
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep as sweep_lib

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _sweep(source: str, **kwargs) -> sweep_lib.Sweep:
  config = decoder_config.DecoderConfig(
      vocab_size=4096, d_model=32, num_heads=2, head_dim=16, num_layers=2,
      d_ff=64, moe_every=2, num_experts=4, expert_d_ff=32, top_k=2,
      group_size=64,
  )
  return sweep_lib.Sweep(
      model_config=config,
      train_config=steps.TrainConfig(
          train_steps=3, save_every_steps=3, log_every_steps=3,
          async_checkpointing=False),
      batch_size=4, sequence_length=32, source=source,
      num_partitions=(2,), scheme_kinds=("family",),
      sharing_levels=("none",), seeds=(0,),
      max_validation_examples=4,
      unlearning=specs.UnlearningConfig(
          forget_language="ur", methods=("exact", "ga"), eval_rows=2,
          attribution_batches=1, stop_rows=2,
          finetune=gradient_methods.FinetuneConfig(
              steps=2, rows_per_batch=2),
          audits=specs.AuditConfig(enabled=False),
      ),
      **kwargs,
  )


def _write_shards(directory, docs_per_split=12):
  for n, code in enumerate(languages.CODES):
    for split in ("", "-validation"):
      path = directory / f"c4-{code}{split}.tfrecord-00000-of-00001.json.gz"
      with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(docs_per_split):
          text = " ".join(WORDS[(n + i + j) % len(WORDS)] for j in range(30))
          f.write(json.dumps({"text": f"{code} {text}", "url": "u",
                              "timestamp": "t"}) + "\n")


def _check_report(output_dir):
  with open(output_dir / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["method"] for r in rows] == ["exact_retrain", "ga"]
  assert {r["config"] for r in rows} == {"family2_none"}
  for name in ("results.md", "per_language.csv", "originals.csv",
               "baselines.json", "pareto.png"):
    assert (output_dir / name).exists(), name
  with open(output_dir / "per_language.csv", newline="") as f:
    per_language = list(csv.DictReader(f))
  assert {r["language"] for r in per_language} == set(languages.CODES)
  assert all(float(r["loss"]) > 0 for r in per_language)


@pytest.mark.heavy
def test_main_job_on_mc4_json_shards_and_mc4_tfds_under_mock_data(
    tmp_path, monkeypatch):
  """Both in one test: the second reuses the first's compiled programs."""
  shards = tmp_path / "c4"
  shards.mkdir()
  _write_shards(shards)
  monkeypatch.setenv(mc4.JSON_DIR_ENV_VAR, str(shards))
  payloads = sweep_lib.run_sweep(
      _sweep("mc4_json", sequential_configurations=("family2_none",),
             sequential_languages=("ur", "de")),
      str(tmp_path / "json"),
  )
  assert len(payloads) == 2  # ur, then the sequence ur -> de.
  _check_report(tmp_path / "json")
  with open(tmp_path / "json" / "sequential.csv", newline="") as f:
    sequence = list(csv.DictReader(f))
  assert [(r["method"], r["forget_language"]) for r in sequence] == [
      ("exact", "ur"), ("ga", "ur"), ("exact", "ur+de"), ("ga", "ur+de")]
  assert (tmp_path / "json" / "sequential.png").exists()
  # The mock has no dataset_info.json, so no split sizes; report its own.
  with tfds.testing.mock_data(num_examples=12), mock.patch.object(
      seqio.TfdsDataSource, "num_input_examples", lambda self, split: 12
  ):
    payloads = sweep_lib.run_sweep(_sweep("mc4"), str(tmp_path / "tfds"))
  assert len(payloads) == 1
  _check_report(tmp_path / "tfds")
