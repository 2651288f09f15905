"""Tests for sequential removal requests (`sequential_removals`).

A tiny family4_none model on the sample corpus removes ur (partition 2),
de (partition 3) and es (partition 3 again) in that order with exact
unlearning, the mask and gradient ascent.
"""

import functools
import math
import os
import types

import jax
import numpy as np
import pytest

import tasks  # pylint: disable=unused-import  (registers the sample tasks)
from tiered_routing import sharding
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import sequential_removals as seq
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import sweep_report

# A module fixture runs a whole removal sequence (pytest.ini).
pytestmark = pytest.mark.heavy

SCHEME = schemes.family(4)
ORDER = ("ur", "de", "es")
METHODS = ("exact", "mask", "ga")
ROWS, LENGTH, STEPS = 8, 32, 30
# (routing table after the removal, partition, codes) of every mixture the
# methods ask for.
RETRAINS = []


def _mixture(table_name, partition, codes):
  RETRAINS.append((table_name, partition, tuple(codes)))
  return seqio_names.language_mixture("sample", table_name, partition, codes)


def _spec():
  config = decoder_config.DecoderConfig(
      vocab_size=4096, d_model=32, num_heads=2, head_dim=16, num_layers=2,
      d_ff=64, moe_every=2, num_experts=4, expert_d_ff=32, top_k=2,
      group_size=64, num_partitions=4, sharing="none",
  )
  return specs.TrainSpec(
      config,
      optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
      steps.TrainConfig(train_steps=STEPS, save_every_steps=STEPS,
                        log_every_steps=STEPS, async_checkpointing=False),
      batch_size=ROWS, sequence_length=LENGTH,
  )


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
  work_dir = str(tmp_path_factory.mktemp("family4_none"))
  data = specs.DataSpec(
      partition_names=tuple(
          seqio_names.partition_mixture_names("sample", SCHEME)),
      task_name=functools.partial(seqio_names.task_name, "sample"),
      mixture_name=_mixture,
  )
  config = specs.UnlearningConfig(
      forget_language=ORDER[0], methods=METHODS, eval_rows=4,
      attribution_batches=1,
      finetune=gradient_methods.FinetuneConfig(
          steps=3, learning_rate=1e-3, rows_per_batch=2),
      audits=specs.AuditConfig(enabled=False),
  )
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1),
                            devices=jax.devices()[:1])
  c = configuration.prepare(
      run="family4_none", scheme=SCHEME, spec=_spec(), data=data,
      config=config, cache=stream_cache.DataCache(LENGTH, seed=0),
      work_dir=work_dir, mesh=mesh,
  )
  rows = seq.run_sequence(c, ORDER, os.path.join(work_dir, "sequential"))
  return c, {(r["method"], r["removals"]): r for r in rows}, rows


def test_one_row_per_method_and_removal(sequence):
  _, by_key, rows = sequence
  assert len(rows) == len(METHODS) * len(ORDER)
  assert set(by_key) == {(m, k) for m in METHODS for k in (1, 2, 3)}
  assert by_key[("ga", 2)]["forget_language"] == "ur+de"
  assert by_key[("ga", 3)]["removed_last"] == "es"


def test_exact_is_the_zero_point_and_costs_one_retrain_per_request(sequence):
  _, by_key, _ = sequence
  for k in (1, 2, 3):
    row = by_key[("exact", k)]
    assert row["forget_loss"] == row["forget_loss_exact"]
    assert row["forget_gap_closed"] == pytest.approx(1.0)
    assert row["retain_loss_delta_vs_exact"] == 0.0
    assert row["steps"] == STEPS  # Each request: one partition retrain.
    assert row["cumulative_steps"] == k * STEPS
    assert row["train_tokens"] <= STEPS * (ROWS // 4) * LENGTH


def test_each_retrain_serves_only_the_languages_left(sequence):
  """The second retrain of partition 3 drops de and es, not only es."""
  assert ("family4-ur", 2, ("ar", "fa", "kk")) in RETRAINS
  assert ("family4-ur-de", 3, ("it", "en", "es")) in RETRAINS
  assert ("family4-ur-de-es", 3, ("it", "en")) in RETRAINS


def test_an_untouched_partition_keeps_the_original_losses(sequence):
  """Partition 1 (zh vi ja ko) serves no removed language: every method,
  after every request, leaves its languages' losses as they were."""
  c, by_key, _ = sequence
  assert SCHEME.partitions[1] == ("zh", "vi", "ja", "ko")
  for (m, k), row in by_key.items():
    for code in SCHEME.partitions[1]:
      assert row[f"loss_{code}"] == c.base[code]["loss"], (m, k, code)


def test_requests_compound_from_the_previous_model(sequence):
  """Each request starts from the model the previous one left: ur's loss
  (partition 2) rose at removal 1 and stays risen through removal 2,
  which changes partition 3 only; de's loss rose at removal 2 and is
  still above the original's after es is removed from the same
  partition."""
  c, by_key, _ = sequence
  for m in ("mask", "ga"):
    one, two, three = (by_key[(m, k)] for k in (1, 2, 3))
    assert one["loss_ur"] > c.base["ur"]["loss"], m
    assert two["loss_ur"] == one["loss_ur"], m
    assert three["loss_ur"] == one["loss_ur"], m
    assert two["loss_de"] > c.base["de"]["loss"], m
    assert three["loss_de"] > c.base["de"]["loss"], m


def test_sweep_report_writes_the_sequence_files(sequence, tmp_path):
  _, _, rows = sequence
  payloads = [
      {"seed": s, "rows": [], "languages": {},
       "sequential": [{**r, "seed": s} for r in rows]}
      for s in (0, 1)
  ]
  sweep_report.write_outputs(str(tmp_path), payloads, "test", {})
  for name in ("sequential.csv", "sequential_by_seed.csv",
               "sequential.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert not (tmp_path / "results.csv").exists()  # No unit rows.
  text = (tmp_path / "sequential.csv").read_text()
  assert "retain_loss_delta_vs_exact_mean" in text
  assert math.isfinite(np.mean([r["cumulative_flops"] for r in rows]))


@pytest.mark.parametrize("scheme, expected", [
    # Every request alone in its partition: the groups run once.
    (schemes.family(16), ["mask", "ga=graddiff", "npo=npo_retain=trace"]),
    # Partitions with other languages: every method is its own run.
    (schemes.family(4), ["mask", "ga", "graddiff", "npo", "npo_retain",
                         "trace"]),
])
def test_methods_identical_for_the_whole_sequence_run_once(scheme, expected):
  c = types.SimpleNamespace(
      scheme=scheme, config=specs.UnlearningConfig(),
      data=types.SimpleNamespace(task_name=lambda code: f"tr.t.{code}_v1"))
  runs = seq.method_runs(c, ("ur", "de", "zh", "es"))
  assert [name for name, _ in runs] == expected
  assert all(name.split("=")[0] == method for name, method in runs)


def test_mask_method_stops_when_a_layer_would_have_no_expert(sequence):
  """Masking the union of every removed language's critical experts can
  cover a whole layer of a partition (two languages of one partition):
  the method then cannot serve the request, and its rows say so."""
  c, by_key, _ = sequence
  assert all(by_key[("mask", k)]["mask_exhausted"] == 0.0 for k in (1, 2, 3))
  cfg = c.spec.model_config
  layers = cfg.num_layers // cfg.moe_every
  every = np.ones((layers, cfg.num_partitions, cfg.num_experts), bool)
  state = seq._State(c.original, c.base, seq.Cost(), every)
  assert seq._mask_step(c, state, active=1) is None
  row = seq._exhausted_row(by_key[("exact", 2)])
  assert (row["method"], row["removals"], row["forget_language"],
          row["mask_exhausted"]) == ("mask", 2, "ur+de", 1.0)
  assert math.isnan(row["forget_gap_closed"]) and math.isnan(row["loss_en"])
