"""A checkpointed pre-training run: restore or initialize, loop, save.

`train` is what `python -m tiered_routing.train` and the trade-off sweep's
original and reference models run. It owns the run directory (a lock,
checkpoints/, train/ metrics) and drives the one loop (`loop.run`) with
`steps.train_step` on the LM objective, adding two hooks: metrics (fetched
from the device only at log and checkpoint steps, with the NaN / Inf guard)
and checkpoints.

Checkpoints hold the whole `TrainState`; the data order is a function of the
step and the step's randomness is `fold_in(seed, step)`, so a run resumed
from a checkpoint computes exactly what an uninterrupted run computes
(bitwise, on the same mesh).
"""

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from tiered_routing import sharding
from tiered_routing.data import host_shards
from tiered_routing.model import decoder_config
from tiered_routing.train import checkpoints
from tiered_routing.train import interrupts
from tiered_routing.train import loop
from tiered_routing.train import metrics_writer
from tiered_routing.train import model_dir_lock
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state

BatchesFn = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


def _restore_or_init(
    ckpt: checkpoints.Checkpointer,
    s: train_state.Setup,
    init_rng: jax.Array,
    batch_shape: tuple[int, int, int],
    init_params: Optional[Callable[[jax.Array], Any]],
) -> train_state.TrainState:
  if ckpt.latest_step() is None:
    logging.info("No checkpoint in %s: initializing.", ckpt.directory)
    return train_state.init_state(s, init_rng, batch_shape, init_params)
  restored = ckpt.restore(s.abstract_state, s.shardings)
  data_step = restored.metadata.get("data_step", restored.step)
  if data_step != restored.step:
    raise ValueError(
        f"Checkpoint {restored.step} in {ckpt.directory} was "
        f"saved at data step {data_step}; they must agree."
    )
  logging.info("Resuming from step %d of %s.", restored.step, ckpt.directory)
  return restored.state


def _checked(batches: Iterator, batch_shape) -> Iterator:
  """`batches`, with the first one's [P, B/P, L] shape checked."""
  first = next(batches, None)
  if first is not None:
    shape = tuple(np.shape(first["decoder_input_tokens"]))
    if shape != tuple(batch_shape):
      raise ValueError(
          f"Batches have shape {shape} but {tuple(batch_shape)} "
          "[P, B/P, L] (or this process's block of it) was declared."
      )
    yield first
  yield from batches


def train(
    *,
    model_dir: str,
    model_config: decoder_config.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    config: steps.TrainConfig,
    batches: BatchesFn,
    batch_shape: tuple[int, int, int],
    mesh: Mesh,
    metadata: Optional[Mapping[str, Any]] = None,
    lock_model_dir: bool = True,
    init_params: Optional[Callable[[jax.Array], Any]] = None,
    host_block: Optional[host_shards.HostBlock] = None,
) -> train_state.TrainState:
  """Trains (or resumes) to `config.train_steps`, checkpointing in model_dir.

  Args:
    model_dir: run directory: checkpoints/, train/ (metrics) and a LOCK file
      that makes a second job on the same directory fail.
    model_config: the decoder.
    optimizer_config: the optimizer.
    config: losses and loop settings.
    batches: `batches(start_step)` iterates over host batches from batch
      `start_step` on (e.g. `pipeline.batch_iterator(dataset, start_step)`):
      the whole [P, B/P, L] batch, the same on every host, or with
      `host_block` this process's block of it.
    batch_shape: [P, B/P, L] of the global batch.
    mesh: device mesh (see `sharding.make_mesh`).
    metadata: extra JSON saved with every checkpoint (e.g. the gin config).
    lock_model_dir: take the model_dir lock (False if the caller holds it).
    init_params: the initial parameters as a function of the init key
      (`train_state.init_state`); None = the model's own init.
    host_block: the block of each global batch this process reads
      (`host_shards.host_block`); None = every host has the whole batch.

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
        model_dir, s, config, batches, batch_shape, mesh,
        dict(metadata or {}), init_params, _feed(batch_shape, mesh, host_block),
    )


class _Feed(NamedTuple):
  """The host batches' shape and how they become global arrays."""

  shape: tuple[int, ...]
  to_device: Callable[[Any], Any]


def _feed(batch_shape, mesh, host_block) -> _Feed:
  if host_block is None:
    return _Feed(tuple(batch_shape),
                 lambda batch: sharding.to_global_batch(batch, mesh))
  return _Feed(host_block.shape, lambda batch: host_shards.to_global_batch(
      batch, mesh, host_block))


def _train_locked(
    model_dir, s, config, batches, batch_shape, mesh, metadata, init_params,
    feed,
):
  """Opens metrics and checkpoints, restores or initializes, and loops."""
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  if config.restore_step is not None:
    for path in checkpoints.set_aside_after(ckpt_dir, config.restore_step):
      logging.warning("restore_step=%d: moved %s aside.",
                      config.restore_step, path)
  writer = metrics_writer.MetricsWriter(os.path.join(model_dir, "train"))
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  try:
    with sharding.with_sharding_rules(mesh), checkpoints.Checkpointer(
        ckpt_dir,
        save_interval_steps=config.save_every_steps,
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
    ) as ckpt:
      state = _restore_or_init(ckpt, s, init_rng, batch_shape, init_params)
      log = metrics_writer.TrainMetricsLog(
          writer, s.schedule, config.train_steps, ckpt_dir
      )
      return _loop(state, s, ckpt, log, batches, feed, mesh, config,
                   step_rng, metadata)
  finally:
    writer.close()


def _save_hook(ckpt, log, config, metadata, stop) -> loop.Hook:
  """Logs every step's metrics; checks and writes them at log steps; saves
  at checkpoint steps (after the check, so a diverged state is never
  saved), and at the step a stop was requested (`interrupts`), which ends
  the loop."""
  last_saved = [ckpt.latest_step()]

  def hook(done, state, metrics):
    log.add(done, metrics)
    is_last = done == config.train_steps
    save = is_last or done % config.save_every_steps == 0
    save = save or stop.requested is not None
    write = is_last or done % config.log_every_steps == 0
    if save or write:
      log.check(last_saved[0])
    if write:
      log.write(done)
    if save and last_saved[0] != done:
      ckpt.save(done, state, {**metadata, "data_step": done}, force=True)
      last_saved[0] = done
    return stop.requested is not None

  return hook


def _loop(state, s, ckpt, log, batches, feed, mesh, config, step_rng,
          metadata) -> train_state.TrainState:
  """Steps from the state's step to config.train_steps."""
  start = int(jax.device_get(state.step))
  if start >= config.train_steps:
    logging.info(
        "Step %d >= train_steps=%d: nothing to do.", start, config.train_steps
    )
    return state
  objective = steps.LmObjective(s.model, config)
  step_fn = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=s.tx),
      out_shardings=(s.shardings, NamedSharding(mesh, PartitionSpec())),
      donate_argnums=0,
  )
  # Several processes would each see their own signals and disagree on
  # where to stop; there Orbax's preemption handling saves.
  stops = (interrupts.StopRequests() if jax.process_count() == 1
           else contextlib.nullcontext(interrupts.StopRequests()))
  with stops as stop:
    state, done = loop.run(
        lambda state, batch: step_fn(state, batch, step_rng),
        state,
        _checked(iter(batches(start)), feed.shape),
        start=start,
        end=config.train_steps,
        to_device=feed.to_device,
        hooks=[_save_hook(ckpt, log, config, metadata, stop)],
    )
  if stop.requested is not None:
    ckpt.wait_until_finished()
    raise interrupts.TrainingInterrupted(
        f"{stop.requested} at step {done}: saved checkpoint {done} in "
        f"{ckpt.directory}; run the same command to resume from it.")
  return state
