"""Optimizers built from a dataclass: AdamW or Adafactor, schedule, clipping.

Strict partitions need an optimizer that never mixes partitions. Global-norm
clipping over all parameters would scale partition p's update by a norm that
includes partition q's gradients, and Adafactor's update clipping and
parameter scaling take RMS values over whole tensors; either would leak
information across partitions and break exact unlearning by retraining one
partition (SISA, Bourtoule et al. 2021). So parameters with a leading
'partition' axis are optimized *partition-wise*: the whole transformation
(clipping included) is `jax.vmap`ped over that axis, as if every partition
were its own model. Shared parameters get an ordinary transformation.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")
# Parameters whose last path entry is one of these are not weight-decayed.
NO_DECAY_NAMES = ("scale", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What `make_optimizer` builds.

  Attributes:
    name: 'adamw' (decoupled weight decay, Loshchilov & Hutter 2019) or
      'adafactor' (Shazeer & Stern 2018).
    learning_rate: peak learning rate.
    schedule: 'cosine' (linear warmup, cosine decay to
      `final_learning_rate_fraction` of the peak), 'rsqrt' (linear warmup,
      then peak * sqrt(warmup / step), as in T5) or 'constant' (after warmup).
    warmup_steps: linear warmup from 0 to the peak.
    decay_steps: step at which the cosine decay ends (warmup included); None
      means the total number of training steps.
    final_learning_rate_fraction: cosine end value as a fraction of the peak.
    b1: AdamW first-moment decay.
    b2: AdamW second-moment decay.
    eps: AdamW epsilon.
    weight_decay: decoupled weight decay (multiplied by the learning rate);
      norm scales and biases are not decayed.
    clip_norm: gradient clipping by global norm (per partition for private
      parameters); 0 disables it.
    adafactor_decay_rate: Adafactor second-moment decay exponent.
    min_dim_size_to_factor: Adafactor factors only dimensions at least this
      large.
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 1000
  decay_steps: Optional[int] = None
  final_learning_rate_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  adafactor_decay_rate: float = 0.8
  min_dim_size_to_factor: int = 128

  def __post_init__(self):
    for field, allowed in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
      if getattr(self, field) not in allowed:
        raise ValueError(
            f"OptimizerConfig.{field}={getattr(self, field)!r} "
            f"is invalid; allowed: {allowed}."
        )
    if not self.learning_rate > 0:  # Also rejects NaN.
      raise ValueError(
          f"OptimizerConfig.learning_rate={self.learning_rate!r}"
          " must be > 0."
      )
    if self.warmup_steps < 0:
      raise ValueError(
          f"OptimizerConfig.warmup_steps={self.warmup_steps!r} " "must be >= 0."
      )
    if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
      raise ValueError(
          f"OptimizerConfig.decay_steps={self.decay_steps!r} must exceed "
          f"warmup_steps={self.warmup_steps!r} (or be None)."
      )
    for field in ("weight_decay", "clip_norm", "final_learning_rate_fraction"):
      if not getattr(self, field) >= 0:
        raise ValueError(
            f"OptimizerConfig.{field}={getattr(self, field)!r} " "must be >= 0."
        )
    for field in ("b1", "b2"):
      if not 0 <= getattr(self, field) < 1:
        raise ValueError(
            f"OptimizerConfig.{field}={getattr(self, field)!r} "
            "must be in [0, 1)."
        )


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step (see `OptimizerConfig`)."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps!r} must be >= 1.")
  peak, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == "cosine":
    decay_steps = config.decay_steps or max(total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=decay_steps,
        end_value=peak * config.final_learning_rate_fraction,
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(1.0, step / warmup) if warmup else 1.0
    if config.schedule == "constant":
      return peak * ramp
    # rsqrt: the peak at the end of warmup, then decay as 1/sqrt(step).
    knee = max(warmup, 1)
    return peak * ramp * jnp.sqrt(knee / jnp.maximum(step, knee))

  return schedule


def _decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay (not norm scales or biases)."""

  def decays(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def _base_transform(
    config: OptimizerConfig, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """Clipping followed by the optimizer proper, for one model's parameters."""
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  if config.name == "adamw":
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
  else:
    parts.append(
        optax.adafactor(
            schedule,
            min_dim_size_to_factor=config.min_dim_size_to_factor,
            decay_rate=config.adafactor_decay_rate,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=_decay_mask,
        )
    )
  return optax.chain(*parts)


def partitionwise(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Applies `inner` separately to every slice of a leading partition axis.

  Every leaf of the parameters, updates and optimizer state handled by the
  returned transformation has the partition axis first, so partition p's
  update depends on partition p's gradients only.
  """

  def init_fn(params):
    return jax.vmap(inner.init)(params)

  def update_fn(updates, state, params=None):
    if params is None:
      return jax.vmap(lambda u, s: inner.update(u, s))(updates, state)
    return jax.vmap(inner.update)(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    config: OptimizerConfig, total_steps: int, partitioned: Any = None
) -> optax.GradientTransformation:
  """Builds the optimizer.

  Args:
    config: what to build.
    total_steps: number of training steps (the default cosine decay length).
    partitioned: optional tree with the structure of the (unboxed) parameters
      and bool leaves, True where the parameter's leading axis is the logical
      'partition' axis (see `partitioned_mask`). Those parameters are
      optimized partition-wise; None treats every parameter as shared.

  Returns:
    An optax transformation over the unboxed parameters.
  """
  inner = _base_transform(config, make_schedule(config, total_steps))
  flags = jax.tree.leaves(partitioned) if partitioned is not None else []
  if not any(flags):
    return inner
  if all(flags):
    return partitionwise(inner)
  labels = jax.tree.map(lambda p: "partitioned" if p else "shared", partitioned)
  return optax.multi_transform(
      {"partitioned": partitionwise(inner), "shared": inner}, labels
  )


def partitioned_mask(boxed_params: Any) -> Any:
  """Whether each parameter's first logical axis is 'partition'.

  Args:
    boxed_params: parameters (or their `jax.eval_shape`) with flax
      `nn.Partitioned` boxes, as returned by `model.init`.

  Returns:
    A bool tree with the structure of the unboxed parameters; unannotated
    leaves count as shared.
  """

  def is_partitioned(leaf):
    names = getattr(leaf, "names", None)
    return bool(names) and names[0] == "partition"

  return jax.tree.map(
      is_partitioned,
      boxed_params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
