"""The one training loop: batches through a compiled step, with hooks.

Every optimizer loop of the package is `run`: pre-training and the sweep's
original and reference models (`trainer.train`, whose hooks log metrics,
guard against non-finite values and save checkpoints), the gradient
unlearning methods (a hook records per-step metrics and stops at a target
forget loss), ESFT and router LoRA, and new-expert training (these three
through `train_params`: a fresh optimizer from step 0, no checkpoints). What
differs is the step (`steps.train_step` bound to an objective and optimizer)
and the hooks, never the loop.

A step is a function of (state, device batch) -> (state, device metrics);
the loop reads nothing from the device itself, so a hook that fetches
metrics only at log steps keeps the device busy in between.
"""

import functools
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state

Batch = Mapping[str, Any]
StepFn = Callable[[train_state.TrainState, Batch], tuple[Any, dict]]
# hook(done_steps, state, metrics) -> True to stop after this step.
Hook = Callable[[int, train_state.TrainState, dict], Optional[bool]]


def run(
    step_fn: StepFn,
    state: train_state.TrainState,
    batches: Iterator[Batch],
    *,
    start: int,
    end: int,
    to_device: Callable[[Batch], Batch] = lambda b: b,
    hooks: Sequence[Hook] = (),
) -> tuple[train_state.TrainState, int]:
  """Runs steps start .. end - 1 (or until a hook asks to stop).

  Args:
    step_fn: the compiled step.
    state: the state at step `start`.
    batches: host batches; the first is step `start`'s.
    start: the first step's index (a resumed run's checkpoint step).
    end: stop before this step.
    to_device: places a host batch (e.g. `sharding.to_global_batch`).
    hooks: called after every step with the number of steps done (step
      index + 1), the new state and the step's device metrics, in order;
      the loop stops after a step for which any hook returns True.

  Returns:
    (the final state, the number of steps done in total).

  Raises:
    ValueError: if `batches` runs out before `end` (training data must
      repeat).
  """
  done = start
  for step in range(start, end):
    try:
      batch = next(batches)
    except StopIteration:
      raise ValueError(
          f"The data ran out at step {step}; training data must repeat "
          "(num_epochs=None) or hold as many batches as steps."
      ) from None
    state, metrics = step_fn(state, to_device(batch))
    done = step + 1
    stop = [hook(done, state, metrics) for hook in hooks]
    if any(stop):
      break
  return state, done


def log_metrics(label: str, every: int) -> Hook:
  """A hook logging every metric of every `every`-th step."""

  def hook(done, state, metrics):
    del state
    if done % max(every, 1) == 0:
      rounded = {k: round(float(v), 4) for k, v in metrics.items()}
      logging.info("%s step %d: %s", label, done, rounded)

  return hook


def train_params(
    objective: steps_lib.Objective,
    tx: optax.GradientTransformation,
    params: Any,
    update_mask: Any,
    batches: Iterator[Batch],
    *,
    steps: int,
    rng: jax.Array,
    to_device: Callable[[Batch], Batch] = lambda b: b,
    hooks: Sequence[Hook] = (),
) -> Any:
  """`steps` steps of `objective` on `params` from a fresh optimizer state.

  The short runs on a trained model that keep no checkpoints (ESFT, router
  LoRA, new-expert training): step 0, `tx.init(params)`, one compiled step.

  Args:
    objective: the loss (`steps.Objective`).
    tx: the optimizer.
    params: the starting parameters (not modified).
    update_mask: a tree like `params` of 0/1 (bool or float): parameters
      at 0 do not move (`steps.StepInputs.update_mask`).
    batches: host batches, at least `steps` of them.
    steps: how many steps.
    rng: the steps' dropout/jitter key.
    to_device: places a host batch.
    hooks: as in `run`.

  Returns:
    The parameters after the last step.
  """
  step_fn = jax.jit(
      functools.partial(steps_lib.train_step, objective=objective, tx=tx)
  )
  inputs = steps_lib.StepInputs(
      update_mask=jax.tree.map(
          lambda m: np.asarray(m, np.float32), update_mask
      )
  )
  state = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  state, _ = run(
      lambda state, batch: step_fn(state, batch, rng, inputs),
      state,
      batches,
      start=0,
      end=steps,
      to_device=to_device,
      hooks=hooks,
  )
  return state.params
