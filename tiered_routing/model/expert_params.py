"""Per-expert views of stacked MoE parameters, expert masks and freezing.

The experts of a MoE layer are stacked along one axis of each expert weight
(`moe.py`), and every router parameter has an axis indexed by expert. Where
the partitions are is set by the sharing level (`transformer.py`):

  sharing 'none' | 'attention'   [P, Ep, ...]: leading partition axis, Ep
                                  experts per partition.
  sharing 'all'                  [P * Ep, ...]: one flat expert axis, partition
                                  p owns experts [p * Ep, (p + 1) * Ep).

Methods that act on single experts (adding or removing one, training only a
few) address "expert e of partition p in MoE layer l" whatever the sharing
level. `to_partition_expert` maps every expert-indexed leaf to the canonical
view [P, Ep, rest...] and `from_partition_expert` maps it back, so those
methods are written once. MoE layers are numbered 0..M-1 in depth order (the
order of `routing_capture.TokenRouting` and `routing_counts.RoutingCounts`).

Freezing by parameter name (a regex on paths) cannot train expert 3 of a
stacked [E, D, F] tensor and freeze expert 4: `trainable_mask` marks entries
element-wise along the expert axis instead, and the train step applies it as
its update mask (`train.steps.StepInputs`) to gradients and updates.
"""

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.model import decoder_config

EXPERT_WEIGHT_NAMES = ("wi", "wi_gate", "wo")
# Router leaves and the position of their expert axis, counted from the end.
_ROUTER_EXPERT_AXIS = {"gates": -2, "kernel": -1, "bias": -1}
_LAYER = re.compile(r"layers_(\d+)$")


@dataclasses.dataclass(frozen=True)
class ExpertLeaf:
  """Where the experts are in one parameter array.

  Attributes:
    moe_layer: index of its MoE layer among the MoE layers (0 = shallowest).
    expert_axis: the axis indexed by expert.
    private: whether axis 0 is the partition axis (else the expert axis holds
      all P * Ep experts).
    is_router: a router parameter (else an expert weight).
  """

  moe_layer: int
  expert_axis: int
  private: bool
  is_router: bool


def path_names(path) -> tuple[str, ...]:
  """Key names of a `tree_flatten_with_path` path."""
  return tuple(
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
      for k in path
  )


def _expert_leaf(names, ndim, config) -> Optional[ExpertLeaf]:
  """The ExpertLeaf of the parameter at `names`, or None if not per expert."""
  layer = [int(m.group(1)) for n in names if (m := _LAYER.match(n))]
  if not layer or not names:
    return None
  moe_layers = config.moe_layers
  if layer[0] not in moe_layers:
    return None
  last = names[-1]
  if "expert" in names and last in EXPERT_WEIGHT_NAMES:
    axis, is_router = ndim - 3, False
  elif "router" in names and last in _ROUTER_EXPERT_AXIS:
    axis, is_router = ndim + _ROUTER_EXPERT_AXIS[last], True
  else:
    return None
  return ExpertLeaf(
      moe_layers.index(layer[0]), axis, config.sharing != "all", is_router
  )


def expert_leaves(
    params: Any, config: decoder_config.DecoderConfig
) -> dict[tuple, ExpertLeaf]:
  """{path names: ExpertLeaf} of every expert-indexed parameter.

  Args:
    params: unboxed parameters of `TieredDecoder(config)` (arrays or
      ShapeDtypeStructs).
    config: the model's config.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    info = _expert_leaf(names, np.ndim(leaf), config)
    if info is not None:
      out[names] = info
  if not out and config.num_experts:
    raise ValueError(
        "No expert parameters found; are these the unboxed "
        "parameters of a TieredDecoder with this config?"
    )
  return out


def to_partition_expert(
    x: jax.Array, info: ExpertLeaf, num_partitions: int
) -> jax.Array:
  """The canonical view [P, Ep, rest...] of an expert-indexed array."""
  if info.private:
    return jnp.moveaxis(x, info.expert_axis, 1)
  x = jnp.moveaxis(x, info.expert_axis, 0)
  return x.reshape((num_partitions, -1) + x.shape[1:])


def from_partition_expert(x_PxE: jax.Array, info: ExpertLeaf) -> jax.Array:
  """Inverse of `to_partition_expert` (the expert count may have changed)."""
  if info.private:
    return jnp.moveaxis(x_PxE, 1, info.expert_axis)
  x = x_PxE.reshape((-1,) + x_PxE.shape[2:])
  return jnp.moveaxis(x, 0, info.expert_axis)


def map_experts(params: Any, config: decoder_config.DecoderConfig, fn) -> Any:
  """Applies `fn(names, info, x_PxEx...) -> y_PxE'x...` to expert leaves.

  Other leaves are returned unchanged. `fn` sees and returns canonical views.
  """
  leaves = expert_leaves(params, config)
  p = config.num_partitions

  def visit(path, x):
    info = leaves.get(path_names(path))
    if info is None:
      return x
    y = fn(path_names(path), info, to_partition_expert(x, info, p))
    return from_partition_expert(y, info)

  return jax.tree_util.tree_map_with_path(visit, params)


def check_selection(
    selected_MxPxE,
    config: decoder_config.DecoderConfig,
    num_experts: Optional[int] = None,
) -> np.ndarray:
  """Validates a bool [M MoE layers, P, Ep] selection of experts."""
  selected = np.asarray(selected_MxPxE)
  num_experts = config.num_experts if num_experts is None else num_experts
  want = (len(config.moe_layers), config.num_partitions, num_experts)
  if selected.shape != want:
    raise ValueError(
        f"expert selection has shape {selected.shape}; expected {want} "
        "(MoE layers, partitions, experts per partition)."
    )
  if selected.dtype != np.bool_:
    raise ValueError(f"expert selection must be bool, got {selected.dtype}.")
  return selected


def _broadcast_mask(
    selected_PxE: np.ndarray, info: ExpertLeaf, ndim: int
) -> np.ndarray:
  """bool mask broadcastable to the leaf (size 1 on unindexed axes)."""
  if info.private:
    shape = [1] * ndim
    shape[0], shape[info.expert_axis] = selected_PxE.shape
    return selected_PxE.reshape(shape)
  shape = [1] * ndim
  shape[info.expert_axis] = selected_PxE.size
  return selected_PxE.reshape(shape)


def trainable_mask(
    params: Any,
    config: decoder_config.DecoderConfig,
    selected_MxPxE,
    *,
    include_router: bool = False,
    others: Any = False,
) -> Any:
  """Which entries of `params` are trainable: the selected experts only.

  Args:
    params: unboxed parameters of `TieredDecoder(config)`.
    config: the model's config.
    selected_MxPxE: bool [MoE layers, P, Ep], True = train this expert.
    include_router: also train the selected experts' router entries (their
      gate rows / kernel columns), e.g. for a newly added expert.
    others: what every other leaf gets (False = frozen): a bool, or a tree
      with the structure of `params` and bool leaves.

  Returns:
    A tree with the structure of `params` whose leaves are bool arrays
    broadcastable to the parameters (the train step's update mask, as
    float 0 / 1).
  """
  selected = check_selection(selected_MxPxE, config)
  leaves = expert_leaves(params, config)
  if isinstance(others, bool):
    others = jax.tree.map(lambda _: others, params)

  def leaf_mask(path, x, other):
    info = leaves.get(path_names(path))
    if info is None or (info.is_router and not include_router):
      return np.asarray(other, bool)
    return _broadcast_mask(selected[info.moe_layer], info, np.ndim(x))

  return jax.tree_util.tree_map_with_path(leaf_mask, params, others)


def count_trainable(params: Any, mask: Any) -> int:
  """Number of parameter entries a `trainable_mask` lets train."""
  sizes = jax.tree.map(
      lambda x, m: int(np.broadcast_to(np.asarray(m), np.shape(x)).sum()),
      params,
      mask,
  )
  return int(sum(jax.tree.leaves(sizes)))
