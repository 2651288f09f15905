"""Device mesh and logical-axis sharding rules.

This is the only module that names mesh axes. Model code annotates parameters
(`nn.with_logical_partitioning`) and key activations
(`nn.with_logical_constraint`) with *logical* axis names; the rules below map
them onto the four mesh axes:

  partition: the tier-1 partitions. Partition-private parameters and the
             `[P, B/P, L]` batch have a leading `partition` axis, so each
             partition's experts, optimizer state and tokens can live on their
             own devices (the "strict partitions" of tiered routing).
  data:      data parallelism inside a partition (the `B/P` axis).
  expert:    expert parallelism (GShard, Lepikhin et al. 2020, Sec. 3.2).
  model:     tensor parallelism of hidden / head / vocabulary dimensions
             (Megatron-LM, Shoeybi et al. 2019).

The mapping is a flax rules table, so it is applied with the usual
`nn.logical_axis_rules` context (see `with_sharding_rules`).
"""

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("partition", "data", "expert", "model")
PARTITION_AXIS = "partition"

# Logical axis name -> mesh axis (or axes, or None = replicated). Rules are in
# priority order: flax gives a dimension the first rule whose mesh axes are not
# already used by another dimension of the same array.
LOGICAL_AXIS_RULES = (
    ("partition", "partition"),
    # A partition-grouped batch `[P, B/P, L]` takes 'partition' on its first
    # dimension, so 'batch' falls through to the second rule below and lands
    # on 'data'. Shared modules see the flattened `[P*B/P, L]`; there the first
    # rule applies and the flattened batch is split over partition x data in
    # that (major-to-minor) order, which is exactly the layout of the
    # row-major reshape of `[P, B/P]`: the reshape moves no data.
    ("batch", ("partition", "data")),
    ("batch", "data"),
    # Only expert weights (and dispatched expert activations) carry 'expert'.
    ("expert", "expert"),
    # Tensor parallelism: hidden dims of dense and expert MLPs, attention heads
    # and the vocabulary are split over 'model'; the residual stream ('embed')
    # stays whole so every layer boundary needs no resharding.
    ("mlp", "model"),
    ("expert_mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    # Replicated: 'embed' (parameters are not FSDP-sharded; mapping it to
    # 'data' would give ZeRO-3-style sharding), sequence 'length', per-head
    # 'kv' and small 'unmodeled' tensors such as router kernels, which every
    # device needs whole to route its own tokens.
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("unmodeled", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the four mesh axes.

  Attributes:
    partition: devices along the tier-1 partition axis.
    data: data-parallel devices.
    expert: expert-parallel devices.
    model: tensor-parallel devices.
  Exactly one axis may be -1, meaning "all devices left over by the others".
  """

  partition: int = 1
  data: int = -1
  expert: int = 1
  model: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if isinstance(size, bool) or not isinstance(size, int) or (
          size < 1 and size != -1):
        raise ValueError(
            f"MeshConfig.{name}={size!r} is invalid: use a positive int, or "
            "-1 to fill with the remaining devices.")
    fill = [name for name in MESH_AXES if getattr(self, name) == -1]
    if len(fill) > 1:
      raise ValueError(
          f"MeshConfig has -1 on axes {fill}; at most one axis may be -1 "
          "(note that data defaults to -1).")

  def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
    """Returns the sizes of MESH_AXES with any -1 resolved.

    Args:
      num_devices: the number of devices the mesh must cover exactly.

    Raises:
      ValueError: if the sizes do not fit `num_devices`.
    """
    sizes = [getattr(self, name) for name in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(
            f"{self}: the product of the fixed axis sizes, {fixed}, does not "
            f"divide the number of devices, {num_devices}.")
      sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(
          f"{self}: the product of the axis sizes, {fixed}, must equal the "
          f"number of devices, {num_devices} (or set one axis to -1).")
    return tuple(sizes)


def make_mesh(config: MeshConfig,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a mesh with axes MESH_AXES over `devices` (default: all devices).

  `jax.make_mesh` orders devices for the physical topology (TPU rings) and
  works on multi-host jobs, where `jax.devices()` lists the devices of every
  process. Axes are `Auto` so GSPMD propagates shardings from the logical
  constraints in the model.
  """
  if devices is None:
    devices = jax.devices()
  sizes = config.axis_sizes(len(devices))
  return jax.make_mesh(
      sizes, MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


def _axes_of(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int],
                      mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
  """Drops mesh axes that do not evenly divide the dimension they shard.

  Tiny test configs (e.g. 2 heads on a 4-way 'model' axis) would otherwise fail
  when arrays are placed. For a dimension sharded over several mesh axes the
  longest leading run of axes that divides it is kept, so the major-to-minor
  layout is unchanged; a dimension that no axis divides is replicated.

  Returns:
    The fitted spec, with one entry per dimension, and one human-readable note
    per changed dimension.
  """
  if len(spec) > len(shape):
    raise ValueError(
        f"PartitionSpec {spec} has {len(spec)} entries but the array has "
        f"shape {tuple(shape)}.")
  entries, notes = [], []
  for dim, size in enumerate(shape):
    axes = _axes_of(spec[dim]) if dim < len(spec) else ()
    kept = axes
    while kept and size % math.prod(mesh.shape[a] for a in kept):
      kept = kept[:-1]
    if kept != axes:
      notes.append(f"dim {dim} (size {size}): mesh axes {axes} -> "
                   f"{kept if kept else 'replicated'}")
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*entries), notes


def _warn_fallbacks(notes: list[str]) -> None:
  if notes:
    unique = sorted(set(notes))
    logging.warning(
        "Mesh axis size does not divide the dimension; replicating instead "
        "(%d arrays affected):\n  %s", len(notes), "\n  ".join(unique))


def _logical_spec(
    names: Any, rules: Sequence[tuple[str, Any]]
) -> PartitionSpec:
  """Maps a tuple of logical names (or a PartitionSpec of them) to mesh axes.

  Unlike flax, an unknown logical name is an error rather than silently
  replicated, so a typo in model code cannot quietly cost memory.
  """
  if names is None:
    return PartitionSpec()
  known = {name for name, _ in rules}
  unknown = [n for n in names if n is not None and n not in known]
  if unknown:
    raise ValueError(
        f"Unknown logical axis names {unknown} in {tuple(names)}; the rules "
        f"know {sorted(known)}.")
  return nn.logical_to_mesh_axes(tuple(names), rules)


def _is_logical_spec(x: Any) -> bool:
  """Whether `x` is one leaf of a logical spec tree."""
  return x is None or isinstance(x, PartitionSpec) or (
      isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))


def logical_to_sharding(logical_spec_tree: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
                        shapes: Any = None) -> Any:
  """Maps a tree of logical specs to NamedShardings on `mesh`.

  Args:
    logical_spec_tree: tree whose leaves are tuples/PartitionSpecs of logical
      axis names (or None for replicated).
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    shapes: optional tree of the same structure whose leaves have `.shape`
      (arrays, ShapeDtypeStructs) or are shape tuples; when given, mesh axes
      that do not divide a dimension are dropped (see `fit_spec_to_shape`).

  Returns:
    A tree of NamedShardings with the structure of `logical_spec_tree`.
  """
  specs = jax.tree.map(lambda n: _logical_spec(n, rules), logical_spec_tree,
                       is_leaf=_is_logical_spec)
  if shapes is not None:
    notes = []

    def fit(spec, shaped):
      shape = shaped.shape if hasattr(shaped, "shape") else tuple(shaped)
      fitted, leaf_notes = fit_spec_to_shape(spec, shape, mesh)
      notes.extend(leaf_notes)
      return fitted

    is_shape = lambda x: isinstance(x, tuple) and all(
        isinstance(d, int) for d in x)
    shapes = jax.tree.leaves(shapes, is_leaf=is_shape)
    spec_leaves, treedef = jax.tree.flatten(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if len(shapes) != len(spec_leaves):
      raise ValueError(
          f"shapes has {len(shapes)} leaves but logical_spec_tree has "
          f"{len(spec_leaves)}.")
    specs = treedef.unflatten(
        [fit(s, x) for s, x in zip(spec_leaves, shapes)])
    _warn_fallbacks(notes)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def params_shardings(abstract_boxed_tree: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                     ) -> Any:
  """NamedShardings for an abstract tree whose leaves may be flax boxes.

  Works on params from `jax.eval_shape(model.init, ...)` and on whole train
  states built from them (optax keeps the boxes in e.g. Adam moments).
  `nn.LogicallyPartitioned` leaves go through `rules`; plain `nn.Partitioned`
  leaves already name mesh axes; any other leaf (step counters, unannotated
  arrays) is replicated. Mesh axes that do not divide a dimension are dropped
  with a warning.

  Returns:
    A tree with the structure of the *unboxed* tree, leaves NamedShardings.
  """
  notes = []

  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec, shape = _logical_spec(leaf.names, rules), leaf.value.shape
    elif isinstance(leaf, nn.Partitioned):
      spec, shape = PartitionSpec(*leaf.names), leaf.value.shape
    else:
      spec, shape = PartitionSpec(), getattr(leaf, "shape", ())
    if len(spec) > len(shape):
      raise ValueError(f"Axis names {spec} do not match the shape {shape}.")
    fitted, leaf_notes = fit_spec_to_shape(spec, shape, mesh)
    notes.extend(leaf_notes)
    return NamedSharding(mesh, fitted)

  shardings = jax.tree.map(
      leaf_sharding, abstract_boxed_tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  _warn_fallbacks(notes)
  return shardings


def batch_sharding(mesh: Mesh, ndim: int,
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
  """Sharding of a partition-grouped batch array `[P, B/P, L, ...]`.

  Args:
    mesh: the device mesh.
    ndim: rank of the batch array (at least 2).
    shape: optional shape; mesh axes that do not divide it are dropped.
  """
  if ndim < 2:
    raise ValueError(
        f"batch_sharding needs ndim >= 2 for a [P, B/P, ...] batch, got "
        f"ndim={ndim}.")
  logical = ("partition", "batch") + (None,) * (ndim - 2)
  spec = _logical_spec(logical, LOGICAL_AXIS_RULES)
  if shape is not None:
    if len(shape) != ndim:
      raise ValueError(f"shape {tuple(shape)} does not have ndim={ndim}.")
    spec, notes = fit_spec_to_shape(spec, shape, mesh)
    _warn_fallbacks(notes)
  return NamedSharding(mesh, spec)


def to_global_batch(
    batch: Mapping[str, Any], mesh: Mesh
) -> dict[str, jax.Array]:
  """Places a host batch `[P, B/P, L]` (the same on every host) on the mesh.

  Every array of `batch` goes to `batch_sharding`: partition p's rows onto
  the 'partition' devices of p, split over 'data'.
  """
  out = {}
  for key, value in batch.items():
    array = np.asarray(value)
    placement = batch_sharding(mesh, array.ndim, array.shape)
    out[key] = jax.make_array_from_callback(
        array.shape, placement, lambda index, a=array: a[index])
  return out


@contextlib.contextmanager
def inside_partition_map() -> Iterator[None]:
  """Rules for code `nn.vmap`ped over partitions with spmd_axis_name.

  A vmap over the tier-1 partition axis with `spmd_axis_name='partition'`
  puts 'partition' on the mapped dimension of every sharding constraint in
  its body. Inside, no logical axis may claim 'partition' again: the body's
  batch is one partition's `B/P` rows, which go to 'data' alone. Without
  this (and without spmd_axis_name) a constraint in the body would leave the
  mapped axis replicated, and every device would hold every partition's
  activations.
  """
  inner = tuple(
      (name, axes)
      for name, axes in nn.get_logical_axis_rules()
      if PARTITION_AXIS not in (axes if isinstance(axes, tuple) else (axes,))
  )
  with nn.logical_axis_rules(inner):
    yield


@contextlib.contextmanager
def with_sharding_rules(
    mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Iterator[Mesh]:
  """Context in which `nn.with_logical_constraint` shards onto `mesh`.

  Sets `mesh` as the current mesh and installs the logical axis rules; must be
  entered outside `jax.jit` (trace and call jitted steps inside it).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh
