"""The training loop (`train`) over the pure steps of `steps`.

Checkpoints hold the whole `TrainState`; the data order is a function of the
step and the step's randomness is `fold_in(seed, step)`, so a run resumed
from a checkpoint computes exactly what an uninterrupted run computes
(bitwise, on the same mesh). Metrics (and the NaN / Inf guard) are fetched
from the device only at log and checkpoint steps.
"""

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from tiered_routing.train import checkpoints
from tiered_routing.train import metrics_writer
from tiered_routing.train import model_dir_lock
from tiered_routing.train import optimizers
from tiered_routing import sharding
from tiered_routing.train import steps
from tiered_routing.train import train_state
from tiered_routing.model import transformer

# The step API, re-exported: trainer.train_step, trainer.TrainConfig, ...
TrainState = train_state.TrainState
TrainConfig = steps.TrainConfig
MODEL_FEATURES = steps.MODEL_FEATURES
per_language_sums = steps.per_language_sums
gradients = steps.gradients
train_step = steps.train_step
eval_step = steps.eval_step

BatchesFn = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


def to_global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, keys=MODEL_FEATURES
) -> dict[str, jax.Array]:
  """Places a host batch [P, B/P, L] (the same on every host) on the mesh."""
  out = {}
  for key in keys:
    if key not in batch:
      continue
    array = np.asarray(batch[key])
    placement = sharding.batch_sharding(mesh, array.ndim, array.shape)
    out[key] = jax.make_array_from_callback(
        array.shape, placement, lambda index, a=array: a[index]
    )
  return out


def _restore_or_init(
    ckpt: checkpoints.Checkpointer,
    s: train_state.Setup,
    init_rng: jax.Array,
    batch_shape: tuple[int, int, int],
) -> TrainState:
  if ckpt.latest_step() is None:
    logging.info("No checkpoint in %s: initializing.", ckpt.directory)
    return train_state.init_state(s, init_rng, batch_shape)
  restored = ckpt.restore(s.abstract_state, s.shardings)
  data_step = restored.metadata.get("data_step", restored.step)
  if data_step != restored.step:
    raise ValueError(
        f"Checkpoint {restored.step} in {ckpt.directory} was "
        f"saved at data step {data_step}; they must agree."
    )
  logging.info("Resuming from step %d of %s.", restored.step, ckpt.directory)
  return restored.state


def _check_batch(batch: Mapping[str, np.ndarray], batch_shape) -> None:
  shape = tuple(np.shape(batch["decoder_input_tokens"]))
  if shape != tuple(batch_shape):
    raise ValueError(
        f"Batches have shape {shape} but batch_shape="
        f"{tuple(batch_shape)} [P, B/P, L] was declared."
    )


def train(
    *,
    model_dir: str,
    model_config: transformer.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    config: TrainConfig,
    batches: BatchesFn,
    batch_shape: tuple[int, int, int],
    mesh: Mesh,
    metadata: Optional[Mapping[str, Any]] = None,
    lock_model_dir: bool = True,
) -> TrainState:
  """Trains (or resumes) to `config.train_steps`, checkpointing in model_dir.

  Args:
    model_dir: run directory: checkpoints/, train/ (metrics) and a LOCK file
      that makes a second job on the same directory fail.
    model_config: the decoder.
    optimizer_config: the optimizer.
    config: losses and loop settings.
    batches: `batches(start_step)` iterates over host batches of
      [P, B/P, L] features from batch `start_step` on, the same on every host
      (e.g. `inputs.batch_iterator(dataset, start_step)`).
    batch_shape: [P, B/P, L] of the batches.
    mesh: device mesh (see `partitioning.make_mesh`).
    metadata: extra JSON saved with every checkpoint (e.g. the gin config).
    lock_model_dir: take the model_dir lock (False if the caller holds it).

  Returns:
    The final train state.

  Raises:
    FloatingPointError: at the first step with a non-finite loss, gradient or
      parameter; the checkpoints saved before it are kept.
    RuntimeError: if another job holds model_dir.
  """
  lock = (
      model_dir_lock.ModelDirLock(model_dir)
      if lock_model_dir
      else contextlib.nullcontext()
  )
  with lock:
    s = train_state.setup(
        model_config, optimizer_config, config.train_steps, mesh, batch_shape
    )
    return _train_locked(
        model_dir, s, config, batches, batch_shape, mesh, dict(metadata or {})
    )


def _train_locked(model_dir, s, config, batches, batch_shape, mesh, metadata):
  """Opens metrics and checkpoints, restores or initializes, and loops."""
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  writer = metrics_writer.MetricsWriter(os.path.join(model_dir, "train"))
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  try:
    with sharding.with_sharding_rules(mesh), checkpoints.Checkpointer(
        ckpt_dir,
        save_interval_steps=config.save_every_steps,
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    ) as ckpt:
      state = _restore_or_init(ckpt, s, init_rng, batch_shape)
      log = metrics_writer.TrainMetricsLog(
          writer, s.schedule, config.train_steps, ckpt_dir
      )
      return _loop(
          state,
          s,
          ckpt,
          log,
          batches,
          batch_shape,
          mesh,
          config,
          step_rng,
          metadata,
      )
  finally:
    writer.close()


def _loop(
    state, s, ckpt, log, batches, batch_shape, mesh, config, step_rng, metadata
) -> TrainState:
  """Steps from the state's step to config.train_steps."""
  start = int(jax.device_get(state.step))
  if start >= config.train_steps:
    logging.info(
        "Step %d >= train_steps=%d: nothing to do.", start, config.train_steps
    )
    return state
  step_fn = jax.jit(
      functools.partial(train_step, model=s.model, tx=s.tx, config=config),
      out_shardings=(s.shardings, NamedSharding(mesh, PartitionSpec())),
      donate_argnums=0,
  )
  last_saved = ckpt.latest_step()
  iterator = batches(start)
  for step in range(start, config.train_steps):
    try:
      host_batch = next(iterator)
    except StopIteration:
      raise ValueError(
          f"The data ran out at step {step}; training data must "
          "repeat (num_epochs=None)."
      ) from None
    if step == start:
      _check_batch(host_batch, batch_shape)
    state, metrics = step_fn(state, to_global_batch(host_batch, mesh), step_rng)
    done = step + 1
    log.add(done, metrics)
    is_last = done == config.train_steps
    save = is_last or done % config.save_every_steps == 0
    write = is_last or done % config.log_every_steps == 0
    if save or write:
      log.check(last_saved)
    if write:
      log.write(done)
    if save:
      ckpt.save(done, state, {**metadata, "data_step": done}, force=True)
      last_saved = done
  return state
