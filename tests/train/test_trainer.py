"""Tests for the trainer, the step and the loop on 8 simulated CPU devices."""

import json
import math
import os
import re
import shutil

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import tasks  # pylint: disable=unused-import  (registers the sample tasks)
from tiered_routing import sharding
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import checkpoints
from tiered_routing.train import metrics_writer
from tiered_routing.train import optimizers
from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state
from tiered_routing.train import trainer

NUM_PARTITIONS = 2
ROWS, LENGTH = 4, 32  # B/P rows of L tokens per partition.
BATCH_SHAPE = (NUM_PARTITIONS, ROWS, LENGTH)


def _model_config(**overrides):
  """One MoE layer (XLA compile time dominates these tests on CPU)."""
  kwargs = dict(
      vocab_size=4096,
      d_model=32,
      num_heads=2,
      head_dim=16,
      num_layers=1,
      moe_every=1,
      num_experts=4,
      expert_d_ff=32,
      top_k=2,
      num_partitions=NUM_PARTITIONS,
      group_size=64,
      dispatch="einsum",
  )
  kwargs.update(overrides)
  return decoder_config.DecoderConfig(**kwargs)


def _mesh(partition=2, data=2, expert=2, model=1):
  return sharding.make_mesh(
      sharding.MeshConfig(
          partition=partition, data=data, expert=expert, model=model
      )
  )


def _one_device_mesh():
  """For numerical tests: compiles faster, and partitions share kernels."""
  return sharding.make_mesh(
      sharding.MeshConfig(data=1), devices=jax.devices()[:1]
  )


@pytest.fixture(scope="module")
def dataset():
  scheme = schemes.family(NUM_PARTITIONS)
  names = seqio_names.partition_mixture_names("sample", scheme)
  return pipeline.partitioned_dataset(
      names,
      global_batch_size=NUM_PARTITIONS * ROWS,
      sequence_length=LENGTH,
      seed=0,
  )


@pytest.fixture(scope="module")
def host_batches(dataset):
  iterator = pipeline.batch_iterator(dataset, 0)
  return [next(iterator) for _ in range(2)]


def _train(model_dir, dataset, steps, mesh=None, learning_rate=3e-2, **config):
  config = dict(
      dict(
          train_steps=steps,
          save_every_steps=10,
          log_every_steps=5,
          async_checkpointing=False,
      ),
      **config
  )
  return trainer.train(
      model_dir=str(model_dir),
      model_config=_model_config(),
      optimizer_config=optimizers.OptimizerConfig(
          learning_rate=learning_rate, warmup_steps=3
      ),
      config=steps_lib.TrainConfig(**config),
      batches=(
          (lambda start: iter(dataset[start:]))
          if isinstance(dataset, list)  # Batches fixed in memory.
          else (lambda start: pipeline.batch_iterator(dataset, start))
      ),
      batch_shape=BATCH_SHAPE,
      mesh=mesh or _mesh(),
  )


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
  """A 30-step run (checkpoints at 10, 20, 30) shared by several tests."""
  model_dir = tmp_path_factory.mktemp("trained")
  state = _train(model_dir, dataset, 30)
  return model_dir, state


def test_loss_falls_and_metrics_are_logged(trained):
  model_dir, _ = trained
  records = metrics_writer.read_jsonl(
      os.path.join(model_dir, "train", metrics_writer.JSONL_NAME)
  )
  assert sorted(records) == [5, 10, 15, 20, 25, 30]
  first, last = records[5], records[30]
  assert first["loss"] > 7.5  # About log(4096) = 8.3 at initialization.
  assert last["loss"] < first["loss"] - 1.0
  # Per-language train loss of exactly the languages of the two partitions.
  seen = {k.split("/")[1] for k in last if k.startswith("cross_entropy/")}
  assert seen <= set(languages.CODES) and len(seen) >= 8
  for key in (
      "tokens_per_second",
      "learning_rate",
      "grad_norm",
      "router/router_entropy",
      "router/dropped_fraction",
      "load_balance_loss",
  ):
    assert math.isfinite(last[key]), key
  assert last["tokens_per_second"] > 0
  usage = last["router/decoder/layers_0/moe/expert_usage_E"]
  assert len(usage) == 4 and abs(sum(usage) - 1.0) < 1e-4
  assert any(
      n.startswith("events.out.tfevents")
      for n in os.listdir(os.path.join(model_dir, "train"))
  )


def test_declared_parameter_shardings(trained):
  _, state = trained
  mesh = _mesh()
  s = train_state.setup(
      _model_config(), optimizers.OptimizerConfig(), 10, mesh, BATCH_SHAPE
  )
  specs = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(
          lambda x: x.sharding.spec,
          state.params,
          is_leaf=lambda x: isinstance(x, jax.Array),
      ),
      is_leaf=lambda x: isinstance(x, P),
  )[0]
  assert specs
  for path, spec in specs:
    name = jax.tree_util.keystr(path)
    # sharing='none': every parameter is private to a partition.
    assert spec[0] == "partition", name
    if "expert" in name:
      assert spec[1] == "expert", name
    else:
      assert "expert" not in jax.tree.leaves(tuple(spec)), name
  # Adam moments are laid out like their parameters.
  adam = [
      x
      for x in jax.tree.leaves(
          s.shardings.opt_state, is_leaf=lambda x: hasattr(x, "mu")
      )
      if hasattr(x, "mu")
  ]
  assert len(adam) == 1
  mu = adam[0].mu
  assert jax.tree.map(lambda x: x.spec, mu) == jax.tree.map(
      lambda x: x.spec, s.shardings.params
  )


def test_attention_sharing_keeps_only_ffn_private():
  s = train_state.setup(
      _model_config(sharing="attention", num_layers=2, moe_every=2, d_ff=64),
      optimizers.OptimizerConfig(),
      10,
      _mesh(),
      BATCH_SHAPE,
  )
  flat = jax.tree_util.tree_flatten_with_path(
      s.shardings.params, is_leaf=lambda x: hasattr(x, "spec")
  )[0]
  seen = set()
  for path, placement in flat:
    name, spec = jax.tree_util.keystr(path), placement.spec
    private = "'moe'" in name or "'mlp'" in name
    assert (len(spec) > 0 and spec[0] == "partition") == private, name
    seen.add("'mlp'" in name)
    if "'expert'" in name:
      assert spec[1] == "expert", name
  assert seen == {True, False}  # Private dense FFNs and shared attention.


def test_restore_onto_another_mesh(trained):
  model_dir, state = trained
  other = _mesh(partition=1, data=2, expert=2, model=2)
  s = train_state.setup(
      _model_config(),
      optimizers.OptimizerConfig(learning_rate=3e-2, warmup_steps=3),
      30,
      other,
      BATCH_SHAPE,
  )
  with checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints")) as c:
    assert c.latest_step() == 30
    restored = c.restore(s.abstract_state, s.shardings)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wi = restored.state.params["decoder"]["layers_0"]["moe"]["expert"]["wi"]
  assert wi.sharding.mesh.shape == other.shape
  assert wi.sharding.spec == P("partition", "expert", None, "model")


def _run_steps(runs, mesh, config=None):
  """Final states of several runs (lists of host batches) from one init."""
  config = config or steps_lib.TrainConfig(train_steps=10)
  s = train_state.setup(
      _model_config(),
      optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
      10,
      mesh,
      BATCH_SHAPE,
  )
  step = jax.jit(
      lambda st, b, r: steps_lib.train_step(
          st,
          b,
          r,
          objective=steps_lib.LmObjective(s.model, config),
          tx=s.tx,
      )
  )
  states = []
  with sharding.with_sharding_rules(mesh):
    init = train_state.init_state(s, jax.random.key(0), BATCH_SHAPE)
    for batches in runs:
      state = init
      for batch in batches:
        state, _ = step(
            state, sharding.to_global_batch(batch, mesh), jax.random.key(1)
        )
      states.append(state)
  return states


def test_strict_partitions_are_independent(host_batches):
  """Changing partition 1's data leaves partition 0's parameters bitwise
  equal (sharing 'none', with clipping and the router losses on)."""
  other = []
  for batch in host_batches:
    changed = dict(batch)
    changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
    changed["decoder_input_tokens"][1] = (
        changed["decoder_input_tokens"][1] * 7 + 3
    ) % 4096
    other.append(changed)
  a, b = _run_steps([host_batches, other], _one_device_mesh())
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x)[0], np.asarray(y)[0])
  assert not all(
      np.array_equal(np.asarray(x)[1], np.asarray(y)[1])
      for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))
  )


def test_gradient_accumulation_matches_full_batch(host_batches):
  # No capacity drops and no router losses: microbatches change neither.
  config = _model_config(capacity_factor=4.0)
  model = transformer.TieredDecoder(config)
  mesh = _one_device_mesh()
  s = train_state.setup(
      config, optimizers.OptimizerConfig(), 10, mesh, BATCH_SHAPE
  )
  results = []
  with sharding.with_sharding_rules(mesh):
    state = train_state.init_state(s, jax.random.key(0), BATCH_SHAPE)
    batch = sharding.to_global_batch(host_batches[0], mesh)
    for m in (1, 2):
      cfg = steps_lib.TrainConfig(
          train_steps=1,
          num_microbatches=m,
          load_balance_factor=0.0,
          router_z_loss_factor=0.0,
      )
      results.append(
          jax.jit(
              lambda p, b, c=cfg: steps_lib.lm_gradients(
                  p,
                  b,
                  jax.random.key(0),
                  objective=steps_lib.LmObjective(model, c),
              )
          )(state.params, batch)
      )
  (g1, m1), *others = results
  for g, m in others:
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(
        m["sums"]["loss_sum_N"], m1["sums"]["loss_sum_N"], rtol=1e-5
    )
    np.testing.assert_array_equal(
        m["sums"]["weight_sum_N"], m1["sums"]["weight_sum_N"]
    )


def test_nan_guard_stops_and_keeps_last_good_checkpoint(
    trained, dataset, tmp_path
):
  model_dir = tmp_path / "run"
  shutil.copytree(trained[0], model_dir)
  # A learning rate of 1e38 overflows float32 parameters within a few
  # updates; every finite step is checkpointed (save_every_steps=1).
  with pytest.raises(FloatingPointError, match="Non-finite values") as info:
    _train(model_dir, dataset, 40, learning_rate=1e38, save_every_steps=1)
  match = re.search(
      r"at training step (\d+) .* Last good checkpoint: step " r"(\d+) in",
      str(info.value),
  )
  assert match, str(info.value)
  bad, good = int(match.group(1)), int(match.group(2))
  assert 30 < bad < 40 and good == bad - 1
  with checkpoints.Checkpointer(model_dir / "checkpoints") as ckpt:
    assert ckpt.latest_step() == good
    params = ckpt.restore_params()
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
  records = metrics_writer.read_jsonl(
      os.path.join(model_dir, "train", metrics_writer.JSONL_NAME)
  )
  assert max(records) < bad
  assert not os.path.exists(model_dir / "LOCK")  # Released on the error.


def test_microbatches_must_divide_rows(host_batches):
  s = train_state.setup(
      _model_config(), optimizers.OptimizerConfig(), 10, _mesh(), BATCH_SHAPE
  )
  config = steps_lib.TrainConfig(train_steps=1, num_microbatches=3)
  with pytest.raises(ValueError, match="num_microbatches=3 must divide"):
    jax.eval_shape(
        lambda p, b: steps_lib.lm_gradients(
            p,
            b,
            jax.random.key(0),
            objective=steps_lib.LmObjective(s.model, config),
        ),
        s.abstract_state.params,
        host_batches[0],
    )


def test_train_config_rejects_bad_values():
  with pytest.raises(ValueError, match="num_microbatches=0"):
    steps_lib.TrainConfig(train_steps=1, num_microbatches=0)
  with pytest.raises(ValueError, match="z_loss=-1"):
    steps_lib.TrainConfig(train_steps=1, z_loss=-1)


def test_metrics_jsonl_skips_torn_lines(tmp_path):
  path = tmp_path / metrics_writer.JSONL_NAME
  path.write_text(
      json.dumps({"step": 1, "loss": 2.0})
      + "\n"
      + json.dumps({"step": 1, "loss": 1.5})
      + "\n"
      + '{"step": 2, "lo'
  )
  assert metrics_writer.read_jsonl(str(path)) == {1: {"step": 1, "loss": 1.5}}


def test_damaged_newest_step_is_refused_then_resumed_from_an_older_one(
    dataset, tmp_path
):
  """One flipped byte in step 40's parameters: the trainer refuses it,
  naming the step and the intact ones, instead of loading wrong values;
  with restore_step=30 it redoes steps 30-40 bitwise as the undamaged run
  did them, and keeps the damaged step aside."""
  intact, damaged = tmp_path / "intact", tmp_path / "damaged"
  # In memory: each pass over a tf.data dataset may reshuffle.
  iterator = pipeline.batch_iterator(dataset, 0)
  dataset = [next(iterator) for _ in range(40)]
  reference = _train(intact, dataset, 40)
  shutil.copytree(intact, damaged)
  data_dir = damaged / "checkpoints" / "40" / "state"
  data = max(
      (p for p in data_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
      key=lambda p: p.stat().st_size,
  )
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(RuntimeError, match=(
      r"step 40 .* is damaged.*Other complete steps: \[20, 30\].*"
      r"restore_step=30")):
    _train(damaged, dataset, 40)
  resumed = _train(damaged, dataset, 40, restore_step=30)
  for a, b in zip(jax.tree.leaves(resumed.params),
                  jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (damaged / "checkpoints" / "40.set-aside").is_dir()
  assert checkpoints.complete_steps(damaged / "checkpoints") == [20, 30, 40]


def test_a_record_after_a_torn_line_is_kept(tmp_path):
  """A kill mid-write leaves a partial last line; the next run's records
  used to be appended onto it and lost with it."""
  path = tmp_path / metrics_writer.JSONL_NAME
  path.write_text(json.dumps({"step": 1, "loss": 2.0}) + '\n{"step": 2, "lo')
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(2, {"loss": 1.5})
  writer.write(3, {"loss": 1.25})
  writer.close()
  assert {s: r["loss"] for s, r in metrics_writer.read_jsonl(
      str(path)).items()} == {1: 2.0, 2: 1.5, 3: 1.25}


def test_tensorboard_reads_the_metrics_as_scalars(tmp_path):
  """Written as TF2 tensor summaries, they were missing from
  EventAccumulator's 'scalars' (TensorBoard's scalar tools)."""
  from tensorboard.backend.event_processing import (  # pylint: disable=g-import-not-at-top
      event_accumulator)
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(10, {"loss": 2.5, "learning_rate": 1e-3})
  writer.write(20, {"loss": 2.0, "learning_rate": 5e-4})
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["learning_rate", "loss"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [
      (10, 2.5), (20, 2.0)]
