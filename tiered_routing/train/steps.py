"""The one optimizer step, and the language-modelling objective it trains.

`train_step` is generic: an *objective* gives the gradients and metrics of a
batch, the optimizer applies them, and an optional update mask confines what
may change. Pre-training, the reference models of the trade-off sweep,
ESFT, router LoRA, the gradient unlearning methods (GA, GradDiff, NPO,
TRACE) and new-expert training all run this step in the one loop
(`loop.run`); what differs between them is data: an objective (a frozen
dataclass), an optimizer and the step's fixed inputs (`StepInputs`).

`LmObjective` is pre-training's: partitions are weighted equally (partition
p contributes its own token-mean cross-entropy, the objective is the mean
over partitions, plus router losses). Together with partition-wise
optimization (`optimizers.partitionwise`) this keeps strict partitions
(sharing 'none') exactly independent: partition p's parameters never depend
on another partition's data, not even through a shared loss normalizer or
clipping norm.

Randomness (dropout, router jitter) is `fold_in(rng, step)`, so a step is a
pure function of (state, batch, rng, inputs).
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tiered_routing.model import forward as forward_lib
from tiered_routing.model import losses
from tiered_routing.model import transformer
from tiered_routing.train import train_state

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loss and loop settings of pre-training (`trainer.train`).

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
    loss_scale: multiplies the whole loss. The loss of a P-partition model
      is the mean over its partitions, so partition p's gradient is 1/P of
      its own loss's; a partition retrained alone as a one-partition model
      (exact unlearning) uses loss_scale = 1/P so that clipping and the
      optimizer see the gradients it had inside the P-partition model.
    restore_step: resume from this checkpoint step instead of the newest
      (e.g. the newest is damaged); the steps after it are moved aside
      (`checkpoints.set_aside_after`), not deleted. None = the newest.
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
  loss_scale: float = 1.0
  restore_step: Optional[int] = None

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
    if not self.loss_scale > 0:
      raise ValueError(
          f"TrainConfig.loss_scale={self.loss_scale!r} must be > 0."
      )


@flax.struct.dataclass
class StepInputs:
  """Traced inputs of a step that stay fixed over a run (not a batch).

  Passing them as arguments, not constants, lets runs that differ only in
  them (the unlearning methods, the partition an update is confined to)
  share one compiled step.

  Attributes:
    update_mask: tree like the parameters with float leaves broadcastable
      to them: 1.0 = may change, 0.0 = frozen. None = all train.
    objective: whatever the objective reads besides parameters and batch
      (e.g. the unlearning methods' reference parameters and coefficients).
  """

  update_mask: Any = None
  objective: Any = None


class Objective(Protocol):
  """What `train_step` optimizes."""

  def gradients(
      self, params: Any, batch: Any, rng: jax.Array, inputs: Any
  ) -> tuple[Any, Metrics]:
    """(gradients with the structure of `params`, flat metrics)."""


def masked(tree: Any, mask: Any) -> Any:
  """`tree` times a 0 / 1 `mask` (frozen entries become 0.0); None = all."""
  if mask is None:
    return tree
  return jax.tree.map(lambda u, m: u * m, tree, mask)


def train_step(
    state: train_state.TrainState,
    batch: Any,
    rng: jax.Array,
    inputs: StepInputs = StepInputs(),
    *,
    objective: Objective,
    tx: optax.GradientTransformation,
) -> tuple[train_state.TrainState, Metrics]:
  """One optimizer step (pure; bind the keyword arguments before `jit`).

  Gradients of frozen entries are zeroed *before* the optimizer, so clipping
  norms and Adam's moments see only the trainable entries, and updates are
  zeroed *after* it, so nothing the optimizer does without a gradient
  (decoupled weight decay, momentum) can move them: p + 0.0 == p.

  Args:
    state: the train state before the step.
    batch: what the objective reads (e.g. [P, B/P, L] features).
    rng: base key; the step's key is `fold_in(rng, state.step)`.
    inputs: the run's fixed inputs (update mask, objective inputs).
    objective: gives gradients and metrics.
    tx: the optimizer.

  Returns:
    The new state and device metrics: the objective's, plus 'grad_norm',
    'param_norm' and 'finite' (loss, gradients and new parameters all
    finite).
  """
  rng = jax.random.fold_in(rng, state.step)
  grads, metrics = objective.gradients(
      state.params, batch, rng, inputs.objective
  )
  grads = masked(grads, inputs.update_mask)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(
      state.params, masked(updates, inputs.update_mask)
  )
  out = dict(metrics)
  out["grad_norm"] = optax.tree.norm(grads)
  out["param_norm"] = optax.tree.norm(params)
  finite = [jnp.isfinite(out["loss"]), jnp.isfinite(out["grad_norm"])]
  finite += [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]
  out["finite"] = jnp.all(jnp.stack(finite))
  return (
      state.replace(step=state.step + 1, params=params, opt_state=opt_state),
      out,
  )


def _microbatch_loss(params, batch, rng, inv_weight_P, *, objective):
  """LM objective of one microbatch and its metrics (sums and means)."""
  config = objective.config
  out = forward_lib.forward(
      objective.model,
      objective.model_params(params),
      batch,
      rng=rng,
      deterministic=False,
      expert_mask_MxPxE=objective.expert_mask(),
      keep_intermediates=True,
  )
  logits, intermediates = out.logits_PxBxLxV, out.intermediates
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
  if config.loss_scale != 1.0:  # Python-level: 1.0 leaves the program as is.
    loss = loss * config.loss_scale
  lang_loss, lang_weight = losses.per_language_sums(
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


@dataclasses.dataclass(frozen=True)
class LmObjective:
  """Pre-training's objective (module doc), optionally seen through a view.

  Attributes:
    model: the decoder.
    config: loss coefficients and gradient accumulation.
    expert_mask_MxPxE: optional fixed per-MoE-layer expert mask (ESFT's
      forced routing).
    params_view: optional map from the trained parameters to the model's
      (e.g. router LoRA adapters merged into the router kernels); None =
      the trained parameters are the model's.
  """

  model: transformer.TieredDecoder
  config: TrainConfig
  expert_mask_MxPxE: Optional[np.ndarray] = None
  params_view: Optional[Callable[[Any], Any]] = None

  def model_params(self, params: Any) -> Any:
    return params if self.params_view is None else self.params_view(params)

  def expert_mask(self) -> Optional[jax.Array]:
    if self.expert_mask_MxPxE is None:
      return None
    return jnp.asarray(self.expert_mask_MxPxE)

  def gradients(self, params, batch, rng, inputs=None):
    del inputs  # Pre-training has no fixed inputs besides the parameters.
    grads, metrics = lm_gradients(params, batch, rng, objective=self)
    return grads, {**metrics["sums"], **metrics["means"]}


def lm_gradients(
    params: Any, batch: Batch, rng: jax.Array, *, objective: LmObjective
) -> tuple[Any, dict[str, Any]]:
  """Gradients of the LM objective on a whole batch, and metrics.

  With `num_microbatches` > 1 the gradients are accumulated over
  microbatches; the per-partition token normalizers come from the whole
  batch, so the result equals the full-batch gradient (router losses, being
  averages over routing groups, are averaged over microbatches).

  Returns:
    (grads, {'sums': ..., 'means': ...}): summed metrics ('loss',
    'cross_entropy_sum', 'weight_sum', per-language 'loss_sum_N' /
    'weight_sum_N') and averaged ones (router losses and metrics).
  """
  weight_P = jnp.sum(
      batch["decoder_loss_weights"].astype(jnp.float32), axis=(1, 2)
  )
  inv_weight_P = 1.0 / jnp.maximum(weight_P, 1.0)
  grad_fn = jax.grad(
      functools.partial(_microbatch_loss, objective=objective), has_aux=True
  )
  m = objective.config.num_microbatches
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
