"""Pure train and eval steps of `TieredDecoder` (`trainer` runs the loop).

The loss weights partitions equally: partition p contributes its own
token-mean cross-entropy, and the objective is the mean over partitions (plus
router losses). Together with partition-wise optimization
(`optimizers.partitionwise`) this keeps strict partitions (sharing 'none')
exactly independent: partition p's parameters never depend on another
partition's data, not even through a shared loss normalizer or clipping norm.

Randomness (dropout, router jitter) is `fold_in(rng, step)`, so a step is a
pure function of (state, batch, rng).
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tiered_routing.tier1 import languages
from tiered_routing.train import train_state
from tiered_routing.model import losses

TrainState = train_state.TrainState

# Features the steps read from a [P, B/P, L] batch (see features.py).
MODEL_FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_language_ids",
    "decoder_segment_ids",
    "decoder_positions",
)
Batch = Mapping[str, jax.Array]


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
    for name in (
        "train_steps",
        "num_microbatches",
        "save_every_steps",
        "log_every_steps",
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= 1.")
    for name in ("z_loss", "load_balance_factor", "router_z_loss_factor"):
      if not getattr(self, name) >= 0:
        raise ValueError(
            f"TrainConfig.{name}={getattr(self, name)!r} must be >= 0."
        )


def per_language_sums(
    per_token_loss: jax.Array, weights: jax.Array, language_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
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
      {"params": params},
      batch["decoder_input_tokens"],
      segment_ids_PxBxL=batch.get("decoder_segment_ids"),
      positions_PxBxL=batch.get("decoder_positions"),
      deterministic=deterministic,
      rngs=rngs,
      mutable=["intermediates"],
  )
  return logits, variables.get("intermediates", {})


def _microbatch_loss(params, batch, rng, inv_weight_P, *, model, config):
  """Objective of one microbatch and its metrics (sums and means)."""
  logits, intermediates = _apply(model, params, batch, rng, False)
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce_PxBxL = losses.cross_entropy_loss(
      logits, batch["decoder_target_tokens"], weights
  )
  token_loss = ce_PxBxL
  if config.z_loss:  # Output z-loss; logsumexp is shared with the CE by XLA.
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    token_loss = token_loss + config.z_loss * jnp.square(log_z) * weights
  m = config.num_microbatches
  router = losses.collect_router_losses(intermediates)
  loss = (
      jnp.mean(jnp.sum(token_loss, axis=(1, 2)) * inv_weight_P)
      + (
          config.load_balance_factor * router["load_balance_loss"]
          + config.router_z_loss_factor * router["router_z_loss"]
      )
      / m
  )
  lang_loss, lang_weight = per_language_sums(
      ce_PxBxL, weights, batch["decoder_language_ids"]
  )
  sums = {
      "loss": loss,
      "cross_entropy_sum": jnp.sum(ce_PxBxL),
      "weight_sum": jnp.sum(weights),
      "loss_sum_N": lang_loss,
      "weight_sum_N": lang_weight,
  }
  means = {**router, **losses.router_metrics(intermediates)}
  return loss, {"sums": sums, "means": means}


def _split_microbatches(x: jax.Array, m: int) -> jax.Array:
  """[P, B, ...] -> [m, P, B/m, ...], microbatch i = rows i, i+m, ...

  Strided rows keep every microbatch spread over all 'data' devices.
  """
  p, b = x.shape[:2]
  if b % m:
    raise ValueError(
        f"num_microbatches={m} must divide the per-partition "
        f"batch size B/P={b}."
    )
  return jnp.moveaxis(x.reshape(p, b // m, m, *x.shape[2:]), 2, 0)


def gradients(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    config: TrainConfig,
) -> tuple[Any, dict[str, Any]]:
  """Gradients of the objective on a whole batch, and metrics.

  With `config.num_microbatches` > 1 the gradients are accumulated over
  microbatches; the per-partition token normalizers come from the whole
  batch, so the result equals the full-batch gradient (router losses, being
  averages over routing groups, are averaged over microbatches).

  Returns:
    (grads, {'sums': ..., 'means': ...}) with the structure of `params` and
    the metrics of `train_step`.
  """
  weight_P = jnp.sum(
      batch["decoder_loss_weights"].astype(jnp.float32), axis=(1, 2)
  )
  inv_weight_P = 1.0 / jnp.maximum(weight_P, 1.0)
  grad_fn = jax.grad(
      functools.partial(_microbatch_loss, model=model, config=config),
      has_aux=True,
  )
  m = config.num_microbatches
  if m == 1:
    return grad_fn(params, batch, rng, inv_weight_P)
  micro = {k: _split_microbatches(v, m) for k, v in batch.items()}

  def body(carry, xs):
    mb, i = xs
    grads, metrics = grad_fn(
        params, mb, jax.random.fold_in(rng, i), inv_weight_P
    )
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype),
      jax.eval_shape(grad_fn, params, first, rng, inv_weight_P),
  )
  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
  metrics["means"] = jax.tree.map(lambda x: x / m, metrics["means"])
  return grads, metrics


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: TrainConfig,
) -> tuple[TrainState, dict[str, Any]]:
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
  grads, metrics = gradients(
      state.params, batch, rng, model=model, config=config
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {**metrics["sums"], **metrics["means"]}
  out["grad_norm"] = optax.tree.norm(grads)
  out["param_norm"] = optax.tree.norm(params)
  finite = [jnp.isfinite(out["loss"]), jnp.isfinite(out["grad_norm"])]
  finite += [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]
  out["finite"] = jnp.all(jnp.stack(finite))
  return (
      state.replace(step=state.step + 1, params=params, opt_state=opt_state),
      out,
  )


def eval_step(
    params: Any, batch: Batch, *, model: nn.Module
) -> dict[str, jax.Array]:
  """Per-language sums of the validation cross-entropy (no z-loss).

  Returns:
    {'loss_sum_N', 'weight_sum_N'}: float32 [NUM_LANGUAGES]; summed over
    batches they give the exact per-language mean loss.
  """
  logits, _ = _apply(model, params, batch, None, True)
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce = losses.cross_entropy_loss(
      logits, batch["decoder_target_tokens"], weights
  )
  loss_sum, weight_sum = per_language_sums(
      ce, weights, batch["decoder_language_ids"]
  )
  return {"loss_sum_N": loss_sum, "weight_sum_N": weight_sum}
