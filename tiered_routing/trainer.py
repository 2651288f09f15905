"""Train state, pure train / eval steps, and the training loop.

The loss weights partitions equally: partition p contributes its own
token-mean cross-entropy, and the objective is the mean over partitions (plus
router losses). Together with partition-wise optimization
(`optimizers.partitionwise`) this keeps strict partitions (sharing 'none')
exactly independent: partition p's parameters never depend on another
partition's data, not even through a shared loss normalizer or clipping norm.

Randomness (dropout, router jitter) is `fold_in(seed, step)`, and the data
order is a function of the step, so a run resumed from a checkpoint repeats
exactly what an uninterrupted run computes.
"""

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

from tiered_routing import checkpoints
from tiered_routing import languages
from tiered_routing import metrics_writer
from tiered_routing import optimizers
from tiered_routing import partitioning
from tiered_routing import train_state
from tiered_routing.model import losses
from tiered_routing.model import transformer

TrainState = train_state.TrainState

# Features the steps read from a [P, B/P, L] batch (see features.py).
MODEL_FEATURES = ("decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights", "decoder_language_ids",
                  "decoder_segment_ids", "decoder_positions")
Batch = Mapping[str, jax.Array]
BatchesFn = Callable[[int], Iterator[Mapping[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loss and loop settings of `train` and `train_step`.

  Attributes:
    train_steps: total number of steps (a resumed run stops there too).
    seed: parameter init and dropout / jitter randomness.
    num_microbatches: gradient accumulation: each batch is split into this
      many microbatches along the B/P axis (must divide B/P).
    z_loss: output softmax z-loss coefficient (PaLM, Chowdhery et al. 2022).
    load_balance_factor: Switch load-balance loss coefficient.
    router_z_loss_factor: ST-MoE router z-loss coefficient.
    save_every_steps: checkpoint period (the last step is always saved).
    keep_checkpoints: newest checkpoints kept; None keeps all.
    log_every_steps: metrics period; non-finite values are also checked then
      and before every save.
    async_checkpointing: write checkpoints in a background thread.
  """

  train_steps: int
  seed: int = 0
  num_microbatches: int = 1
  z_loss: float = 1e-4
  load_balance_factor: float = 0.01
  router_z_loss_factor: float = 0.001
  save_every_steps: int = 1000
  keep_checkpoints: Optional[int] = 3
  log_every_steps: int = 100
  async_checkpointing: bool = True

  def __post_init__(self):
    for name in ("train_steps", "num_microbatches", "save_every_steps",
                 "log_every_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= 1.")
    for name in ("z_loss", "load_balance_factor", "router_z_loss_factor"):
      if not getattr(self, name) >= 0:
        raise ValueError(
            f"TrainConfig.{name}={getattr(self, name)!r} must be >= 0.")


def per_language_sums(per_token_loss: jax.Array, weights: jax.Array,
                      language_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sums of weighted per-token loss and of weights for each language id.

  Args:
    per_token_loss: [...] loss already multiplied by `weights`.
    weights: [...] loss weights (0 at padding).
    language_ids: [...] int ids in [0, NUM_LANGUAGES).

  Returns:
    (loss_sum_N, weight_sum_N), float32 [NUM_LANGUAGES]; the exact
    per-language mean loss is loss_sum_N / weight_sum_N.
  """
  n = languages.NUM_LANGUAGES
  ids = language_ids.reshape(-1).astype(jnp.int32)
  zeros = jnp.zeros((n,), jnp.float32)
  loss_sum = zeros.at[ids].add(per_token_loss.reshape(-1).astype(jnp.float32))
  weight_sum = zeros.at[ids].add(weights.reshape(-1).astype(jnp.float32))
  return loss_sum, weight_sum


def _apply(model, params, batch, rng, deterministic):
  """Logits and sown intermediates of one [P, B/P, L] batch."""
  rngs = None
  if rng is not None:
    dropout_rng, jitter_rng = jax.random.split(rng)
    rngs = {"dropout": dropout_rng, "jitter": jitter_rng}
  logits, variables = model.apply(
      {"params": params}, batch["decoder_input_tokens"],
      segment_ids_PxBxL=batch.get("decoder_segment_ids"),
      positions_PxBxL=batch.get("decoder_positions"),
      deterministic=deterministic, rngs=rngs, mutable=["intermediates"])
  return logits, variables.get("intermediates", {})


def _microbatch_loss(params, batch, rng, inv_weight_P, *, model, config):
  """Objective of one microbatch and its metrics (sums and means)."""
  logits, intermediates = _apply(model, params, batch, rng, False)
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce_PxBxL = losses.cross_entropy_loss(
      logits, batch["decoder_target_tokens"], weights)
  token_loss = ce_PxBxL
  if config.z_loss:  # Output z-loss; logsumexp is shared with the CE by XLA.
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    token_loss = token_loss + config.z_loss * jnp.square(log_z) * weights
  m = config.num_microbatches
  router = losses.collect_router_losses(intermediates)
  loss = jnp.mean(jnp.sum(token_loss, axis=(1, 2)) * inv_weight_P) + (
      config.load_balance_factor * router["load_balance_loss"]
      + config.router_z_loss_factor * router["router_z_loss"]) / m
  lang_loss, lang_weight = per_language_sums(
      ce_PxBxL, weights, batch["decoder_language_ids"])
  sums = {"loss": loss, "cross_entropy_sum": jnp.sum(ce_PxBxL),
          "weight_sum": jnp.sum(weights), "loss_sum_N": lang_loss,
          "weight_sum_N": lang_weight}
  means = {**router, **losses.router_metrics(intermediates)}
  return loss, {"sums": sums, "means": means}


def _split_microbatches(x: jax.Array, m: int) -> jax.Array:
  """[P, B, ...] -> [m, P, B/m, ...], microbatch i = rows i, i+m, ...

  Strided rows keep every microbatch spread over all 'data' devices.
  """
  p, b = x.shape[:2]
  if b % m:
    raise ValueError(f"num_microbatches={m} must divide the per-partition "
                     f"batch size B/P={b}.")
  return jnp.moveaxis(x.reshape(p, b // m, m, *x.shape[2:]), 2, 0)


def gradients(params: Any, batch: Batch, rng: jax.Array, *, model: nn.Module,
              config: TrainConfig) -> tuple[Any, dict[str, Any]]:
  """Gradients of the objective on a whole batch, and metrics.

  With `config.num_microbatches` > 1 the gradients are accumulated over
  microbatches; the per-partition token normalizers come from the whole
  batch, so the result equals the full-batch gradient (router losses, being
  averages over routing groups, are averaged over microbatches).

  Returns:
    (grads, {'sums': ..., 'means': ...}) with the structure of `params` and
    the metrics of `train_step`.
  """
  weight_P = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32),
                     axis=(1, 2))
  inv_weight_P = 1.0 / jnp.maximum(weight_P, 1.0)
  grad_fn = jax.grad(functools.partial(_microbatch_loss, model=model,
                                       config=config), has_aux=True)
  m = config.num_microbatches
  if m == 1:
    return grad_fn(params, batch, rng, inv_weight_P)
  micro = {k: _split_microbatches(v, m) for k, v in batch.items()}

  def body(carry, xs):
    mb, i = xs
    grads, metrics = grad_fn(params, mb, jax.random.fold_in(rng, i),
                             inv_weight_P)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype),
      jax.eval_shape(grad_fn, params, first, rng, inv_weight_P))
  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
  metrics["means"] = jax.tree.map(lambda x: x / m, metrics["means"])
  return grads, metrics


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               config: TrainConfig) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step (pure; bind the keyword arguments before `jit`).

  Args:
    state: the train state before the step.
    batch: [P, B/P, L] features (MODEL_FEATURES).
    rng: base key; the step's key is `fold_in(rng, state.step)`.
    model: the `TieredDecoder`.
    tx: its optimizer.
    config: losses and gradient accumulation.

  Returns:
    The new state and device metrics: 'loss', 'cross_entropy_sum',
    'weight_sum', per-language 'loss_sum_N' / 'weight_sum_N', router losses
    and metrics, 'grad_norm', 'param_norm' and 'finite' (loss, gradients
    and new parameters all finite).
  """
  rng = jax.random.fold_in(rng, state.step)
  grads, metrics = gradients(state.params, batch, rng, model=model,
                              config=config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {**metrics["sums"], **metrics["means"]}
  out["grad_norm"] = optax.global_norm(grads)
  out["param_norm"] = optax.global_norm(params)
  finite = [jnp.isfinite(out["loss"]), jnp.isfinite(out["grad_norm"])]
  finite += [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]
  out["finite"] = jnp.all(jnp.stack(finite))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), out


def eval_step(params: Any, batch: Batch, *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Per-language sums of the validation cross-entropy (no z-loss).

  Returns:
    {'loss_sum_N', 'weight_sum_N'}: float32 [NUM_LANGUAGES]; summed over
    batches they give the exact per-language mean loss.
  """
  logits, _ = _apply(model, params, batch, None, True)
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce = losses.cross_entropy_loss(logits, batch["decoder_target_tokens"],
                                       weights)
  loss_sum, weight_sum = per_language_sums(ce, weights,
                                           batch["decoder_language_ids"])
  return {"loss_sum_N": loss_sum, "weight_sum_N": weight_sum}


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                    keys=MODEL_FEATURES) -> dict[str, jax.Array]:
  """Places a host batch [P, B/P, L] (the same on every host) on the mesh."""
  out = {}
  for key in keys:
    if key not in batch:
      continue
    array = np.asarray(batch[key])
    sharding = partitioning.batch_sharding(mesh, array.ndim, array.shape)
    out[key] = jax.make_array_from_callback(array.shape, sharding,
                                            lambda index, a=array: a[index])
  return out



def _restore_or_init(ckpt: checkpoints.Checkpointer, s: train_state.Setup,
                     init_rng: jax.Array,
                     batch_shape: tuple[int, int, int]) -> TrainState:
  if ckpt.latest_step() is None:
    logging.info("No checkpoint in %s: initializing.", ckpt.directory)
    return train_state.init_state(s, init_rng, batch_shape)
  restored = ckpt.restore(s.abstract_state, s.shardings)
  data_step = restored.metadata.get("data_step", restored.step)
  if data_step != restored.step:
    raise ValueError(f"Checkpoint {restored.step} in {ckpt.directory} was "
                     f"saved at data step {data_step}; they must agree.")
  logging.info("Resuming from step %d of %s.", restored.step, ckpt.directory)
  return restored.state


def _check_batch(batch: Mapping[str, np.ndarray], batch_shape) -> None:
  shape = tuple(np.shape(batch["decoder_input_tokens"]))
  if shape != tuple(batch_shape):
    raise ValueError(f"Batches have shape {shape} but batch_shape="
                     f"{tuple(batch_shape)} [P, B/P, L] was declared.")


def train(*, model_dir: str, model_config: transformer.DecoderConfig,
          optimizer_config: optimizers.OptimizerConfig, config: TrainConfig,
          batches: BatchesFn, batch_shape: tuple[int, int, int], mesh: Mesh,
          metadata: Optional[Mapping[str, Any]] = None,
          lock_model_dir: bool = True) -> TrainState:
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
  lock = (checkpoints.ModelDirLock(model_dir) if lock_model_dir
          else contextlib.nullcontext())
  with lock:
    s = train_state.setup(model_config, optimizer_config, config.train_steps,
                          mesh, batch_shape)
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    writer = metrics_writer.MetricsWriter(os.path.join(model_dir, "train"))
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    try:
      with partitioning.with_sharding_rules(mesh), checkpoints.Checkpointer(
          ckpt_dir, save_interval_steps=config.save_every_steps,
          max_to_keep=config.keep_checkpoints,
          async_save=config.async_checkpointing) as ckpt:
        state = _restore_or_init(ckpt, s, init_rng, batch_shape)
        log = metrics_writer.TrainMetricsLog(writer, s.schedule,
                                             config.train_steps, ckpt_dir)
        return _loop(state, s, ckpt, log, batches, batch_shape, mesh, config,
                     step_rng, dict(metadata or {}))
    finally:
      writer.close()


def _loop(state, s, ckpt, log, batches, batch_shape, mesh, config, step_rng,
          metadata) -> TrainState:
  """Steps from the state's step to config.train_steps."""
  start = int(jax.device_get(state.step))
  if start >= config.train_steps:
    logging.info("Step %d >= train_steps=%d: nothing to do.", start,
                 config.train_steps)
    return state
  step_fn = jax.jit(
      functools.partial(train_step, model=s.model, tx=s.tx, config=config),
      out_shardings=(s.shardings, NamedSharding(mesh, PartitionSpec())),
      donate_argnums=0)
  last_saved = ckpt.latest_step()
  iterator = batches(start)
  for step in range(start, config.train_steps):
    try:
      host_batch = next(iterator)
    except StopIteration:
      raise ValueError(f"The data ran out at step {step}; training data must "
                       "repeat (num_epochs=None).") from None
    if step == start:
      _check_batch(host_batch, batch_shape)
    state, metrics = step_fn(state, to_global_batch(host_batch, mesh),
                             step_rng)
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
