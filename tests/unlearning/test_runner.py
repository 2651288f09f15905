"""Tests for the unlearning runner, its methods, evaluator and data cache.

One small strict-partition configuration (family2_none: ur in partition 1
with seven other languages) is trained once for the module and unlearned with
every method; the tests read its results and checkpoints.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

import tasks  # pylint: disable=unused-import  (registers the sample tasks)
from tiered_routing import sharding
from tiered_routing.data import eval_data
from tiered_routing.data import feature_rows
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import layout
from tiered_routing.tier1 import schemes
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state
from tiered_routing.unlearning import combined_objective
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import held_out_stop
from tiered_routing.unlearning import methods
from tiered_routing.unlearning import objectives
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import trace

# A module fixture trains and forgets a whole configuration (pytest.ini).
pytestmark = pytest.mark.heavy

SCHEME = schemes.family(2)
FORGET = "ur"
ROWS, LENGTH, STEPS = 4, 32, 40
# Stated bound: GradDiff, NPO+retain and TRACE keep the retained languages' mean
# validation loss within this many nats of the original's.
RETAIN_BOUND = 0.05


def _register(table_name, partition, codes):
  """A mixture of the given languages (what the script registers)."""
  name = seqio_names.partition_name("sample", table_name, partition)
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(
        name, [(seqio_names.task_name("sample", c), 1.0) for c in codes]
    )
  return name


DATA = specs.DataSpec(
    partition_names=tuple(
        seqio_names.partition_mixture_names("sample", SCHEME)
    ),
    task_name=functools.partial(seqio_names.task_name, "sample"),
    mixture_name=_register,
)


def _spec(sharing="none"):
  config = decoder_config.DecoderConfig(
      vocab_size=4096,
      d_model=32,
      num_heads=2,
      head_dim=16,
      num_layers=2,
      d_ff=64,
      moe_every=2,
      num_experts=4,
      expert_d_ff=32,
      top_k=2,
      group_size=64,
      num_partitions=2,
      sharing=sharing,
  )
  return specs.TrainSpec(
      config,
      optimizers.OptimizerConfig(learning_rate=1e-2, warmup_steps=5),
      steps.TrainConfig(
          train_steps=STEPS,
          save_every_steps=STEPS,
          log_every_steps=STEPS,
          async_checkpointing=False,
      ),
      batch_size=2 * ROWS,
      sequence_length=LENGTH,
  )


UNLEARN = specs.UnlearningConfig(
    forget_language=FORGET,
    finetune=gradient_methods.FinetuneConfig(
        steps=5, learning_rate=1e-3, rows_per_batch=2
    ),
    attribution_batches=2,
    audits=specs.AuditConfig(
        relearn_budgets=(8,), relearn_steps=4, router_rows=4, router_docs=100
    ),
)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(
      sharding.MeshConfig(data=1), devices=jax.devices()[:1]
  )


@pytest.fixture(scope="module")
def cache():
  return stream_cache.DataCache(LENGTH, seed=0)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, mesh, cache):
  work_dir = str(tmp_path_factory.mktemp("family2_none"))
  result = runner.run_configuration(
      run="family2_none",
      scheme=SCHEME,
      spec=_spec(),
      data=DATA,
      config=UNLEARN,
      cache=cache,
      work_dir=work_dir,
      mesh=mesh,
  )
  return work_dir, {r.method: r.to_row() for r in result.results}, result


def test_every_method_raises_the_forget_loss(outcome):
  _, rows, _ = outcome
  assert list(rows) == [
      "exact_retrain",
      "mask",
      "ga",
      "graddiff",
      "npo",
      "npo_retain",
      "trace",
  ]
  for method, row in rows.items():
    assert row["forget_loss_delta"] > 0, (method, row)
  # The reference closes the whole gap by definition; the rest partly.
  assert rows["exact_retrain"]["forget_gap_closed"] == pytest.approx(1.0)
  for method in ("ga", "graddiff", "npo", "npo_retain", "trace"):
    assert rows[method]["forget_gap_closed"] > 0


def test_graddiff_and_trace_keep_retain_loss_within_bound(outcome):
  _, rows, _ = outcome
  for method in ("graddiff", "npo_retain", "trace"):
    assert abs(rows[method]["retain_loss_delta"]) < RETAIN_BOUND, rows[method]
    assert abs(rows[method]["family_loss_delta"]) < 2 * RETAIN_BOUND


def test_strict_methods_touch_only_the_forget_partition(outcome):
  _, rows, result = outcome
  other = [c for c in SCHEME.partitions[0]]
  for method, langs in result.languages.items():
    for code in other:
      assert langs[code] == result.languages["original"][code], method
  assert rows["exact_retrain"]["other_partitions_identical"] is True
  # Cost of the exact retrain: one partition's steps and tokens only.
  assert rows["exact_retrain"]["steps"] == STEPS
  assert rows["exact_retrain"]["train_tokens"] <= STEPS * ROWS * LENGTH


def _max_partition_diff(whole, alone, partition):
  return max(
      float(np.max(np.abs(np.asarray(w)[partition] - np.asarray(a)[0])))
      for w, a in zip(jax.tree.leaves(whole), jax.tree.leaves(alone))
  )


def test_partition_retrained_alone_matches_the_whole_model_retrained(
    outcome, tmp_path, mesh, cache
):
  """The fast exact retrain (partition 1 alone from its initialization, on
  its stream, loss scaled by 1/P) matches the slow one (the whole vmapped
  model retrained with only partition 1's stream changed) up to float
  reassociation; unscaled, clipping and Adam see P x larger gradients and
  it drifts far further. The other partitions are the original's."""
  work_dir, rows, _ = outcome
  spec = _spec()
  retained = tuple(c for c in SCHEME.partitions[1] if c != FORGET)
  ref_names = [DATA.partition_names[0], _register("family2-ur", 1, retained)]
  whole, _ = configuration.train_model(
      str(tmp_path / "whole"), spec, ref_names, cache, mesh
  )
  init = train_state.partition_init(
      transformer.TieredDecoder(spec.model_config), 1, spec.batch_shape
  )
  alone, tokens = configuration.train_model(
      f"{work_dir}/reference",  # Restored: the runner's exact retrain.
      spec.partition_alone(),
      [ref_names[1]],
      cache,
      mesh,
      first_partition=1,
      init_params=init,
  )
  unscaled_spec = dataclasses.replace(
      spec.partition_alone(), train_config=spec.train_config
  )
  unscaled, _ = configuration.train_model(
      str(tmp_path / "unscaled"),
      unscaled_spec,
      [ref_names[1]],
      cache,
      mesh,
      first_partition=1,
      init_params=init,
  )
  close = _max_partition_diff(whole, alone, 1)
  assert close < 1e-4, close
  assert _max_partition_diff(whole, unscaled, 1) > 100 * max(close, 1e-6)
  assert rows["exact_retrain"]["train_tokens"] == int(tokens.sum())


def _random_batch(key, shape, vocab):
  k1, k2, k3 = jax.random.split(key, 3)
  tokens = jax.random.randint(k1, shape, 1, vocab)
  weights = (jax.random.uniform(k2, shape) < 0.8).astype(jnp.int32)
  return {
      "decoder_input_tokens": tokens,
      "decoder_target_tokens": jax.random.randint(k3, shape, 1, vocab),
      "decoder_loss_weights": weights,
      "decoder_segment_ids": jnp.ones(shape, jnp.int32),
      "decoder_positions": jnp.broadcast_to(jnp.arange(shape[-1]), shape),
  }


@pytest.fixture(scope="module")
def combined_loss(tiny_model):
  """The jitted combined objective of the conftest's 'attention' model."""
  objective = combined_objective.UnlearningObjective(
      tiny_model("attention").model, w_min=0.1, w_max=10.0
  )
  return jax.jit(
      functools.partial(combined_objective.combined_loss, objective=objective)
  )


@pytest.mark.parametrize("method", gradient_methods.METHODS)
def test_combined_loss_equals_the_library_objectives(
    method, tiny_model, combined_loss
):
  """One program for all methods computes each method's own objective."""
  m = tiny_model("attention")
  params = nn.meta.unbox(m.variables["params"])
  ref_params = jax.tree.map(lambda x: x * 1.01, params)
  shape = m.tokens.shape
  forget = _random_batch(jax.random.PRNGKey(2), shape, 32)
  retain = _random_batch(jax.random.PRNGKey(3), shape, 32)
  critical = np.zeros((1, 2, 4), bool)
  critical[0, 1, [0, 3]] = True  # layer 1 (the MoE layers are 0 and 1)
  critical = np.concatenate([critical, critical[:, ::-1]])
  config = gradient_methods.FinetuneConfig()
  inputs = combined_objective.UnlearningInputs(
      ref_params, critical, config.coefficients(method)
  )
  loss, _ = combined_loss(
      params, {"forget": forget, "retain": retain}, inputs
  )

  def log_probs(p, batch):
    logits, routing, _ = m.routed_forward(
        p,
        {
            "decoder_input_tokens": batch["decoder_input_tokens"],
            "decoder_segment_ids": batch["decoder_segment_ids"],
        },
    )
    logp = objectives.token_log_likelihood(
        logits, batch["decoder_target_tokens"]
    )
    flat = lambda x: x.reshape(-1, shape[-1])
    return (
        objectives.TokenLogProbs(
            flat(logp),
            flat(batch["decoder_loss_weights"]).astype(jnp.float32),
            flat(batch["decoder_segment_ids"]),
        ),
        routing,
    )

  f, routing_f = log_probs(params, forget)
  r, routing_r = log_probs(params, retain)
  ref = log_probs(ref_params, forget)[0].logp
  if method == "trace":
    pids = layout.token_partition_ids(shape)
    f_freq = trace.activation_frequency(
        trace.critical_hits(routing_f, critical, pids),
        f.weights.reshape(-1) > 0,
    )
    want, _ = trace.trace_loss(
        config.trace,
        f,
        r,
        trace.critical_hits(routing_r, critical, pids),
        f_freq,
        ref,
    )
  else:
    want, _ = objectives.unlearning_loss(
        config.objective_config(method), f, r, ref
    )
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  # The method's record of coefficients encodes its objective.
  coeffs = config.coefficients(method)
  assert (coeffs.ga > 0) == (method in ("ga", "graddiff"))
  assert (coeffs.npo > 0) == (method in ("npo", "npo_retain", "trace"))
  assert (coeffs.retain > 0) == (method in ("graddiff", "npo_retain", "trace"))
  assert (coeffs.trace > 0) == (method == "trace")


def test_update_mask_confines_attention_unlearning_to_one_partition(tiny_model):
  """Sharing 'attention': shared and partition-1 parameters change,
  partition 0's private experts stay bitwise the same."""
  m = tiny_model("attention")
  params = nn.meta.unbox(m.variables["params"])
  config = gradient_methods.FinetuneConfig(steps=2, rows_per_batch=2)
  mask = gradient_methods.update_mask(m.model, params, partition=1)
  batches = [
      _random_batch(jax.random.PRNGKey(i), m.tokens.shape, 32) for i in range(4)
  ]
  stack = lambda bs: {k: np.stack([b[k] for b in bs]) for k in bs[0]}
  new, history = gradient_methods.unlearn(
      m.config,
      optimizers.OptimizerConfig(),
      config,
      params,
      {"forget": stack(batches[:2]), "retain": stack(batches[2:])},
      config.coefficients("graddiff"),
      np.zeros((2, 2, 4), bool),
      mask,
  )
  assert history["loss"].shape == (2,)
  private = optimizers.partitioned_mask(
      jax.eval_shape(lambda: m.model.init(jax.random.PRNGKey(0), m.tokens))[
          "params"
      ]
  )
  changed_shared = False
  for is_private, old, now in zip(
      jax.tree.leaves(private), jax.tree.leaves(params), jax.tree.leaves(new)
  ):
    old, now = np.asarray(old), np.asarray(now)
    if is_private:
      np.testing.assert_array_equal(old[0], now[0])
      assert not np.array_equal(old[1], now[1])
    else:
      changed_shared |= not np.array_equal(old, now)
  assert changed_shared


def test_held_out_stop_ends_after_the_step_that_reached_the_target(
    tiny_model,
):
  """With the target first reached by the held-out NLL after step 2 the
  loop stops right there, with the parameters of a two-step run."""
  m = tiny_model("none")
  params = nn.meta.unbox(m.variables["params"])
  config = gradient_methods.FinetuneConfig(steps=4, rows_per_batch=2)
  batches = [
      _random_batch(jax.random.PRNGKey(i), m.tokens.shape, 32) for i in range(8)
  ]
  held_out = _random_batch(jax.random.PRNGKey(9), m.tokens.shape, 32)
  stack = lambda bs: {k: np.stack([b[k] for b in bs]) for k in bs[0]}
  mask = jax.tree.map(lambda _: np.ones((), np.float32), params)
  run = lambda n, stop=None: gradient_methods.unlearn(
      m.config,
      optimizers.OptimizerConfig(),
      config,
      params,
      {"forget": stack(batches[:n]), "retain": stack(batches[4 : 4 + n])},
      config.coefficients("ga"),
      np.zeros((2, 2, 4), bool),
      mask,
      stop=stop,
  )
  _, full = run(4, held_out_stop.HeldOutStop(held_out, math.inf))
  nll = full["held_out_forget_nll"]
  assert len(nll) == 4 and nll[0] < nll[1], nll  # GA pushed it up.
  target = (nll[0] + nll[1]) / 2
  stopped, history = run(4, held_out_stop.HeldOutStop(held_out, target))
  np.testing.assert_array_equal(history["held_out_forget_nll"], nll[:2])
  two, _ = run(2)
  for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(two)):
    np.testing.assert_array_equal(a, b)
  assert held_out_stop.mean_nll(m.config, two, held_out) == pytest.approx(
      nll[1], rel=1e-6
  )


def test_cached_streams_are_the_trainers_batches(cache):
  names = DATA.partition_names
  got = cache.partitioned(names, ROWS, 3)
  dataset = pipeline.partitioned_dataset(
      names, global_batch_size=2 * ROWS, sequence_length=LENGTH, seed=0
  )
  for step, batch in enumerate(pipeline.batch_iterator(dataset, 0)):
    if step == 3:
      break
    for key, value in got.items():
      np.testing.assert_array_equal(value[step], batch[key])
  # A None partition has all-zero rows (no loss weight).
  half = cache.partitioned([names[0], None], ROWS, 2)
  assert not half["decoder_loss_weights"][:, 1].any()
  np.testing.assert_array_equal(
      half["decoder_input_tokens"][:, 0], got["decoder_input_tokens"][:2, 0]
  )


def test_rechunk_and_chunk_rows():
  rows = {"decoder_input_tokens": np.arange(2 * 3 * 2).reshape(2, 3, 2)}
  out = feature_rows.rechunk(rows, 4, 2)["decoder_input_tokens"]
  flat = np.arange(12).reshape(6, 2)
  np.testing.assert_array_equal(out.reshape(8, 2), flat[np.arange(8) % 6])
  chunks = feature_rows.chunk_rows({"decoder_input_tokens": flat}, 4)
  assert [c["decoder_input_tokens"].shape for c in chunks] == [(4, 2), (4, 2)]
  np.testing.assert_array_equal(chunks[1]["decoder_input_tokens"][2:], 0)


def test_evaluator_alone_matches_the_full_model(outcome, cache, mesh):
  """Per-partition (one-partition model) evaluation, the sweep's, equals the
  full model's evaluation of the same rows."""
  work_dir, _, result = outcome
  spec = _spec()
  params, _ = configuration.train_model(
      f"{work_dir}/original", spec, DATA.partition_names, cache, mesh
  )
  validation = cache.validation_rows(
      {c: DATA.task_name(c) for c in languages.CODES}
  )
  evaluator = language_eval.LanguageEvaluator(
      spec.model_config,
      eval_data.language_blocks(validation, SCHEME, 2),
      vocabulary=None,
      partitions_alone=False,
  )
  full = evaluator.evaluate(params).losses
  for code, r in result.languages["original"].items():
    assert r["tokens"] == full[code].num_tokens
    np.testing.assert_allclose(r["loss"], full[code].loss, rtol=1e-5)


def test_regroup_pads_with_zero_rows():
  batches = {
      "decoder_input_tokens": np.arange(3 * 2 * 2 * 1).reshape(3, 2, 2, 1) + 1
  }
  out = feature_rows.regroup(batches, 4)["decoder_input_tokens"]
  assert out.shape == (2, 2, 4, 1)
  np.testing.assert_array_equal(out[0, 1, :, 0], [3, 4, 7, 8])
  np.testing.assert_array_equal(out[1, 0, :, 0], [9, 10, 0, 0])


def test_uniform_forget_scores_log_vocab():
  results = {
      "ur": {"loss": 2.0, "bpb": 1.0, "tokens": 10.0, "bytes": 20.0},
      "en": {"loss": 3.0, "bpb": 1.5, "tokens": 5.0, "bytes": 9.0},
  }
  out = methods.uniform_forget(results, "ur", 4096)
  assert out["en"] == results["en"]
  np.testing.assert_allclose(out["ur"]["loss"], np.log(4096))
  np.testing.assert_allclose(out["ur"]["bpb"], 12 * 10 / 20)  # log2(4096)


def test_config_validation():
  with pytest.raises(ValueError, match="methods"):
    specs.UnlearningConfig(methods=("exact", "retrain"))
  with pytest.raises(ValueError, match="attribution_batches"):
    specs.UnlearningConfig(attribution_batches=50)
  with pytest.raises(ValueError, match="Unknown language"):
    specs.UnlearningConfig(forget_language="xx")
  with pytest.raises(ValueError, match="steps"):
    gradient_methods.FinetuneConfig(steps=0)
  with pytest.raises(ValueError, match="batch_size"):
    dataclasses.replace(_spec(), batch_size=3)
  with pytest.raises(ValueError, match="num_experts"):
    configuration.check_moe(
        dataclasses.replace(_spec().model_config, num_experts=0)
    )


def test_every_row_is_audited_with_exact_as_the_zero_point(outcome):
  _, rows, _ = outcome
  for method, row in rows.items():
    for name in ("loss", "zlib", "minkpp"):
      assert 0.0 <= row[f"mia_auc_{name}"] <= 1.0, (method, name)
    for bits in (8, 4):
      assert math.isfinite(row[f"quant_int{bits}_forget_loss"]), method
    assert 0.0 <= row["verbmem_rougel"] <= 1.0
    assert row["mia_paragraphs"] >= 4
    assert math.isfinite(row["routing_replay_forget_loss"]), method
    assert math.isfinite(row["router_classifier_retain_loss"]), method
    assert 0.0 <= row["router_classifier_forget_own_share"] <= 1.0
  exact = rows["exact_retrain"]
  # The retrained partition is the reference: PrivLeak 0 by construction.
  for name in ("loss", "zlib", "minkpp"):
    assert exact[f"privleak_{name}"] == 0.0
  assert exact["verbmem_rougel"] == exact["verbmem_rougel_reference"]
  # A model that never saw the language learns it from its text.
  assert 0.0 < exact["relearn_8_recovered"]
  # The mask method's weights are the original's: unmasked, they start
  # where the original is.
  mask = rows["mask"]
  start = float(mask["relearn_8_curve"].split()[0])
  np.testing.assert_allclose(start, mask["relearn_original_nll"], atol=1e-4)
