"""Tests for the one step (train.steps) and the one loop (train.loop)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tiered_routing.train import loop
from tiered_routing.train import steps
from tiered_routing.train import train_state


@dataclasses.dataclass(frozen=True)
class _ConstantGradients:
  """An objective whose gradient is 1 everywhere (loss 0)."""

  def gradients(self, params, batch, rng, inputs):
    del batch, rng, inputs
    return jax.tree.map(jnp.ones_like, params), {"loss": jnp.zeros(())}


@dataclasses.dataclass(frozen=True)
class _Quadratic:
  """loss = sum (params - batch['target'])^2 * inputs (a fixed weight)."""

  def gradients(self, params, batch, rng, inputs):
    del rng

    def loss(p):
      return inputs * jnp.sum((p["w"] - batch["target"]) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    return grads, {"loss": value}


def _state(params, tx):
  return train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )


def test_frozen_entries_stay_bitwise_under_adamw_momentum_and_decay():
  params = {"a": jnp.arange(6.0).reshape(2, 3) + 0.5, "b": jnp.ones(3)}
  mask = {"a": np.array([[1.0], [0.0]], np.float32), "b": np.float32(0.0)}
  tx = optax.adamw(0.1, weight_decay=0.5)
  state = _state(params, tx)
  # A non-zero first moment, as restored from an earlier run.
  state = state.replace(
      opt_state=jax.tree.map(
          lambda x: x + 1.0 if x.dtype == jnp.float32 else x, state.opt_state
      )
  )
  step = jax.jit(
      functools.partial(
          steps.train_step, objective=_ConstantGradients(), tx=tx
      )
  )
  inputs = steps.StepInputs(update_mask=mask)
  for _ in range(3):
    state, metrics = step(state, {}, jax.random.key(0), inputs)
  np.testing.assert_array_equal(state.params["a"][1], [3.5, 4.5, 5.5])
  np.testing.assert_array_equal(state.params["b"], np.ones(3))
  assert not np.array_equal(state.params["a"][0], [0.5, 1.5, 2.5])
  assert int(state.step) == 3 and bool(metrics["finite"])
  # The gradient norm is taken after masking: only row 0 of 'a' counts.
  np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(3.0), rtol=1e-6)


def test_step_inputs_are_traced_not_constants():
  """Runs that differ only in their fixed inputs share one compiled step."""
  tx = optax.sgd(0.1)
  traces = []

  def counted(*args, **kwargs):
    traces.append(1)
    return steps.train_step(*args, **kwargs)

  step = jax.jit(functools.partial(counted, objective=_Quadratic(), tx=tx))
  params = {"w": jnp.zeros(2)}
  batch = {"target": jnp.ones(2)}
  out = []
  for weight in (1.0, 2.0):
    state, _ = step(
        _state(params, tx),
        batch,
        jax.random.key(0),
        steps.StepInputs(objective=jnp.float32(weight)),
    )
    out.append(np.asarray(state.params["w"]))
  assert len(traces) == 1
  # w - lr * 2 * weight * (w - 1) at w = 0: 0.2 * weight.
  np.testing.assert_allclose(out, [[0.2, 0.2], [0.4, 0.4]], rtol=1e-6)


def _sgd_run(num_batches, start=0, hooks=(), end=None):
  tx = optax.sgd(0.5)
  step = jax.jit(
      functools.partial(steps.train_step, objective=_Quadratic(), tx=tx)
  )
  batches = iter(
      [{"target": jnp.full(2, float(i))} for i in range(num_batches)]
  )
  return loop.run(
      lambda st, b: step(st, b, jax.random.key(0), steps.StepInputs(
          objective=jnp.float32(1.0))),
      _state({"w": jnp.zeros(2)}, tx),
      batches,
      start=start,
      end=num_batches if end is None else end,
      hooks=hooks,
  )


def test_loop_runs_every_step_and_calls_hooks_in_order():
  seen = []
  state, done = _sgd_run(4, hooks=[lambda d, s, m: seen.append(d)])
  assert done == 4 and seen == [1, 2, 3, 4] and int(state.step) == 4
  # SGD at lr 0.5 on (w - t)^2 jumps straight to each batch's target.
  np.testing.assert_allclose(state.params["w"], [3.0, 3.0])


def test_loop_stops_after_the_step_a_hook_stops_at():
  seen = []

  def stop_at_two(done, state, metrics):
    del state, metrics
    seen.append(done)
    return done == 2

  state, done = _sgd_run(4, hooks=[stop_at_two])
  assert done == 2 and seen == [1, 2]
  np.testing.assert_allclose(state.params["w"], [1.0, 1.0])


def test_loop_refuses_data_that_runs_out():
  with pytest.raises(ValueError, match="ran out at step 3"):
    _sgd_run(3, end=5)


def test_train_params_matches_the_loop_it_wraps_and_keeps_frozen_leaves():
  tx = optax.adam(0.1)
  params = {"w": jnp.array([0.0, 1.0]), "frozen": jnp.array([2.0])}
  mask = {"w": np.array([True, False]), "frozen": np.array(False)}

  def batches():
    return iter([{"target": jnp.full(2, float(i))} for i in range(3)])

  objective = _ConstantGradients()
  trained = loop.train_params(
      objective, tx, params, mask, batches(), steps=3, rng=jax.random.key(0)
  )
  # The same three steps written out: fresh Adam state, float 0/1 mask.
  step = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=tx)
  )
  inputs = steps.StepInputs(
      update_mask=jax.tree.map(lambda m: np.float32(m), mask)
  )
  state = _state(params, tx)
  for batch in batches():
    state, _ = step(state, batch, jax.random.key(0), inputs)
  jax.tree.map(np.testing.assert_array_equal, trained, state.params)
  np.testing.assert_array_equal(trained["frozen"], [2.0])
  assert trained["w"][1] == 1.0 and trained["w"][0] < 0.0
  np.testing.assert_array_equal(params["w"], [0.0, 1.0])  # Not modified.


def test_log_metrics_logs_every_nth_step(caplog):
  hook = loop.log_metrics("esft", 2)
  # On absl's own logger: a test that parses and then unparses absl's
  # flags (test_count_params) leaves it at --verbosity's default, WARNING.
  with caplog.at_level("INFO", logger="absl"):
    for done in range(1, 6):
      hook(done, None, {"loss": jnp.float32(done / 3)})
  logged = [r.getMessage() for r in caplog.records]
  assert logged == [
      "esft step 2: {'loss': 0.6667}",
      "esft step 4: {'loss': 1.3333}",
  ]
