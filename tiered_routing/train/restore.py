"""Restores the parameters of a trained MODEL_DIR onto the devices at hand.

Analysis and generation need only the parameters, not the optimizer state,
and they often run somewhere else than training did (a laptop, one GPU, a
smaller TPU slice). Orbax writes every array per shard together with its
global shape, so the parameters can be read into any target layout: here
the layout the logical-axis rules give on a mesh of the current devices
(`sharding.MeshConfig()` puts them all on 'data', which replicates the
parameters and splits evaluation batches), or, without a model config, the
saved tree replicated on that mesh.

The checkpoint directory is opened read-only (`checkpoints.read_subtree`): a
trainer's `Checkpointer` deletes unfinished step directories when it starts,
which must not happen to a run that is still training while it is analyzed.
"""

import os
from typing import Any, Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec

from tiered_routing import sharding
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.train import checkpoints
from tiered_routing.train import train_state

PARAMS_KEY = "params"
# Parameter shapes do not depend on the batch; this one only builds them.
_INIT_ROWS, _INIT_LENGTH = 1, 8


def checkpoint_dir(model_dir: str) -> str:
  """The trainer's checkpoint directory, MODEL_DIR/checkpoints.

  Raises:
    FileNotFoundError: if it does not exist.
  """
  path = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"No checkpoint directory {path}; MODEL_DIR={model_dir!r} must be "
        "the directory a `tiered_routing.train` run wrote."
    )
  return path


def _pick_step(directory: str, step: Optional[int]) -> int:
  steps = checkpoints.complete_steps(directory)
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint in {directory}.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(
        f"checkpoint_step={step!r} has no complete checkpoint in "
        f"{directory}; allowed: {steps}."
    )
  return step


def abstract_params(
    config: decoder_config.DecoderConfig, mesh: jax.sharding.Mesh
) -> Any:
  """ShapeDtypeStructs of the model's params, sharded by the logical rules."""
  model = transformer.TieredDecoder(config)
  batch_shape = (config.num_partitions, _INIT_ROWS, _INIT_LENGTH)
  with sharding.with_sharding_rules(mesh):
    _, abstract, shardings = train_state.param_layout(model, mesh, batch_shape)
  return checkpoints.abstract_like(abstract, shardings)


def _replicated_like(saved_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(
          tuple(m.shape), m.dtype, sharding=replicated
      ),
      saved_tree,
  )


def _check_shapes(saved_tree: Any, target: Any) -> None:
  """Raises ValueError unless the saved params match the model's."""
  saved = {
      jax.tree_util.keystr(k): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
  }
  wanted = {
      jax.tree_util.keystr(k): tuple(v.shape)
      for k, v in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  if saved.keys() != wanted.keys():
    missing = sorted(wanted.keys() - saved.keys())[:3]
    extra = sorted(saved.keys() - wanted.keys())[:3]
    raise ValueError(
        "The checkpoint's params do not fit the model config: missing "
        f"{missing}, unexpected {extra} (give the training run's gin files)."
    )
  for name, shape in wanted.items():
    if saved[name] != shape:
      raise ValueError(
          f"Param {name} has shape {saved[name]} in the checkpoint but "
          f"{shape} in the model config (give the training run's gin files)."
      )


def restore_params(
    model_dir: str,
    config: Optional[decoder_config.DecoderConfig] = None,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    step: Optional[int] = None,
) -> tuple[int, Any]:
  """Reads the params of one checkpoint of MODEL_DIR onto `mesh`.

  Args:
    model_dir: the training run's directory (holds checkpoints/).
    config: the model; with it the params are laid out by the logical-axis
      rules (and their shapes checked against the model), without it the
      saved tree is restored replicated.
    mesh: target mesh; default all current devices on 'data'.
    step: checkpoint step; None = the newest complete one.

  Returns:
    (step, params).
  """
  mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
  directory = checkpoint_dir(model_dir)
  step = _pick_step(directory, step)

  def target(saved_params):
    if config is None:
      return _replicated_like(saved_params, mesh)
    wanted = abstract_params(config, mesh)
    _check_shapes(saved_params, wanted)
    return wanted

  params = checkpoints.read_subtree(
      directory, step, key=PARAMS_KEY, target=target
  )
  return step, params
