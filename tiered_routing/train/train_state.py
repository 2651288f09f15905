"""The train state and its sharded layout on a mesh.

Parameters are created boxed (`nn.with_logical_partitioning`), which is where
their logical axes are declared; the state itself holds plain arrays (Orbax
saves unboxed trees), and its shardings are derived once from the boxes:
parameters through `sharding.params_shardings`, optimizer statistics
through the parameter they belong to.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from tiered_routing import sharding
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import one_partition
from tiered_routing.train import optimizers


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds: step counter, parameters, optimizer."""

  step: jax.Array
  params: Any
  opt_state: Any


def _strip_boxes(tree: Any) -> Any:
  """Removes flax partitioning boxes (no sharding constraints applied)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False)
      if isinstance(x, nn.Partitioned)
      else x,
      tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def _init_params(
    model: transformer.TieredDecoder,
    rng: jax.Array,
    batch_shape: tuple[int, int, int],
) -> Any:
  """Boxed parameters (parameter shapes do not depend on B/P or L)."""
  tokens = jnp.zeros(batch_shape, jnp.int32)
  return model.init({"params": rng}, tokens)["params"]


def abstract_boxed_params(model: transformer.TieredDecoder) -> Any:
  """Abstract boxed parameters (their logical axes); nothing allocated.

  Parameter shapes do not depend on the batch, so a [P, 1, 2] batch is used.
  """
  tokens = jnp.zeros((model.config.num_partitions, 1, 2), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))[
      "params"
  ]


def _path_keys(path) -> tuple[str, ...]:
  return tuple(
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
      for k in path
  )


def _opt_state_shardings(
    opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Shardings of optimizer-state leaves, found through parameter paths.

  Optimizer states repeat the parameter tree below their own containers
  (e.g. `mu/decoder/...`), so a leaf whose path ends in a parameter's path
  takes that parameter's sharding when the shapes agree. Leaves with other
  shapes (Adafactor's factored statistics, partition-wise step counts) keep
  only a leading 'partition' sharding; everything else is replicated.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  table = {}
  for (path, p), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(param_shardings),
  ):
    table[_path_keys(path)] = (p.shape, s)

  def sharding_of(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      if keys[start:] in table:
        shape, placement = table[keys[start:]]
        if tuple(leaf.shape) == tuple(shape):
          return placement
        lead = placement.spec[0] if placement.spec else None
        if lead is not None and leaf.ndim and leaf.shape[0] == shape[0]:
          return NamedSharding(mesh, PartitionSpec(lead))
        return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The optimizer and the abstract, sharded layout of the train state."""

  model: transformer.TieredDecoder
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState
  shardings: TrainState
  boxed_params: Any


def param_layout(
    model: transformer.TieredDecoder,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
) -> tuple[Any, Any, Any]:
  """(boxed, abstract, shardings) of the model's parameters; no allocation.

  `boxed` keeps the flax boxes with the logical axis names; `abstract` is the
  unboxed tree of ShapeDtypeStructs the train state holds.
  """
  boxed = jax.eval_shape(
      functools.partial(_init_params, model, batch_shape=batch_shape),
      jax.random.key(0),
  )
  return (
      boxed,
      _strip_boxes(boxed),
      sharding.params_shardings(boxed, mesh),
  )


def setup(
    model_config: decoder_config.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    train_steps: int,
    mesh: Mesh,
    batch_shape: tuple[int, int, int],
) -> Setup:
  """Builds the model, optimizer and state shardings (no arrays allocated)."""
  model = transformer.TieredDecoder(model_config)
  boxed, params, param_shardings = param_layout(model, mesh, batch_shape)
  tx = optimizers.make_optimizer(
      optimizer_config, train_steps, optimizers.partitioned_mask(boxed)
  )
  opt_state = jax.eval_shape(tx.init, params)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=params,
      opt_state=opt_state,
  )
  shardings = TrainState(
      step=NamedSharding(mesh, PartitionSpec()),
      params=param_shardings,
      opt_state=_opt_state_shardings(opt_state, params, param_shardings, mesh),
  )
  schedule = optimizers.make_schedule(optimizer_config, train_steps)
  return Setup(model, tx, schedule, abstract, shardings, boxed)


def init_state(
    s: Setup,
    rng: jax.Array,
    batch_shape: tuple[int, int, int],
    init_params: Optional[Callable[[jax.Array], Any]] = None,
) -> TrainState:
  """A fresh, sharded train state (step 0).

  Args:
    s: the setup.
    rng: the init key.
    batch_shape: [P, B/P, L].
    init_params: rng -> unboxed parameters, instead of the model's own init
      (e.g. one partition of a P-partition model's init, for retraining
      that partition alone from the same initialization).
  """

  def init_fn(rng):
    if init_params is not None:
      params = init_params(rng)
    else:
      params = _strip_boxes(_init_params(s.model, rng, batch_shape))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=s.tx.init(params),
    )

  return jax.jit(init_fn, out_shardings=s.shardings)(rng)


def partition_init(
    model: transformer.TieredDecoder,
    partition: int,
    batch_shape: tuple[int, int, int],
) -> Callable[[jax.Array], Any]:
  """rng -> partition p of a strict-partition `model`'s initial parameters,
  as a one-partition model's: what `init_state` needs to retrain that
  partition alone from the initialization it had (SISA)."""
  if model.config.sharing != "none":
    raise ValueError(
        "Only strict partitions (sharing 'none') can be initialized alone; "
        f"got sharing={model.config.sharing!r}."
    )

  def init(rng):
    params = _strip_boxes(_init_params(model, rng, batch_shape))
    return one_partition.partition_params(params, partition)

  return init
