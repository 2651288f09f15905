"""Per-host input: each process reads only its block of the global batch.

A global batch is `[P, B/P, L]`: partition p's rows come from its own
stream (`pipeline.partitioned_dataset`). The mesh puts partition p's rows
on the devices of 'partition' index p, split over 'data'
(`sharding.batch_sharding`), so on a pod each host addresses a rectangular
block: some partitions and, within each, a contiguous run of rows. Building
the whole global batch on every host and slicing it would make each of N
hosts read, tokenize and pack N times the data it needs.

Here every partition's stream is split into `num_row_shards` row shards:
shard j reads SeqIO's `ShardInfo(j, num_row_shards)` of the partition's
mixture, (B/P) / num_row_shards rows a step, and fills rows
[j * r, (j + 1) * r) of the partition's block. A host reads the shards
its devices hold (`host_block`), and `to_global_batch` assembles the
global array from every host's block
(`jax.make_array_from_process_local_data`). The global batch depends on
`num_row_shards`, not on which process reads which shard: a one-process
run with the same number of row shards sees the identical batch, which is
what the two-process test (tests/train/test_two_processes.py) checks. As
with T5X's per-host `ShardInfo`, the data order changes with the number of
row shards; sources shard by files (mC4 from TFDS or json) need at least
that many files per language.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from tiered_routing import sharding


@dataclasses.dataclass(frozen=True)
class HostBlock:
  """The part of the global `[P, B/P, L]` batch one process reads.

  Attributes:
    partitions: the global partition ids, in order.
    row_shards: the row shards read within each of them, in order.
    num_row_shards: row shards per partition in the whole batch.
    global_shape: `[P, B/P, L]`.
  """

  partitions: tuple[int, ...]
  row_shards: tuple[int, ...]
  num_row_shards: int
  global_shape: tuple[int, int, int]

  @property
  def rows_per_shard(self) -> int:
    return self.global_shape[1] // self.num_row_shards

  @property
  def shape(self) -> tuple[int, int, int]:
    """The host batch: [partitions, rows of its shards, L]."""
    return (len(self.partitions),
            len(self.row_shards) * self.rows_per_shard,
            self.global_shape[2])


def whole_batch(batch_shape: Sequence[int]) -> HostBlock:
  """The block of a process that reads everything in one row shard."""
  return HostBlock(tuple(range(batch_shape[0])), (0,), 1, tuple(batch_shape))


def _span(slices, size: int, what: str) -> tuple[int, int]:
  """(start, stop) covered by the slices, which must tile it."""
  covered = set()
  for s in slices:
    covered.update(range(*s.indices(size)))
  start, stop = min(covered), max(covered) + 1
  if len(covered) != stop - start:
    raise ValueError(
        f"This process's devices hold {what} {sorted(covered)} of the "
        "batch, which are not contiguous; allowed: a mesh whose devices "
        "give each process one contiguous block (sharding.make_mesh)."
    )
  return start, stop


def host_block(
    mesh, batch_shape: Sequence[int], num_row_shards: Optional[int] = None
) -> HostBlock:
  """The block of the global batch this process's devices hold.

  Args:
    mesh: the device mesh.
    batch_shape: `[P, B/P, L]`.
    num_row_shards: row shards per partition; None = as many as split
      the rows among the processes (1 on one process).

  Raises:
    ValueError: if the devices do not hold one rectangle of whole shards.
  """
  shape = tuple(int(x) for x in batch_shape)
  placement = sharding.batch_sharding(mesh, 3, shape)
  indices = list(placement.addressable_devices_indices_map(shape).values())
  p0, p1 = _span([i[0] for i in indices], shape[0], "partitions")
  r0, r1 = _span([i[1] for i in indices], shape[1], "rows")
  local_rows = r1 - r0
  shards = shape[1] // local_rows if num_row_shards is None else (
      num_row_shards)
  if shards < 1 or shape[1] % shards:
    raise ValueError(
        f"num_row_shards={shards} does not divide the {shape[1]} rows of a "
        "partition; allowed: a divisor of B/P."
    )
  per_shard = shape[1] // shards
  if r0 % per_shard or local_rows % per_shard:
    raise ValueError(
        f"num_row_shards={shards} (rows of {per_shard}) splits this "
        f"process's rows [{r0}, {r1}); allowed: a multiple of "
        f"{shape[1] // local_rows} that divides {shape[1]}."
    )
  return HostBlock(
      tuple(range(p0, p1)),
      tuple(range(r0 // per_shard, r1 // per_shard)),
      shards,
      shape,
  )


def to_global_batch(
    batch: Mapping[str, Any], mesh, block: HostBlock
) -> dict[str, jax.Array]:
  """Global arrays from every process's block (each passes its own)."""
  out = {}
  for key, value in batch.items():
    array = np.asarray(value)
    if array.shape[:3] != block.shape:
      raise ValueError(
          f"Batch feature {key!r} has shape {array.shape}; this process "
          f"reads the block {block.shape} of {block.global_shape}."
      )
    shape = block.global_shape + array.shape[3:]
    placement = sharding.batch_sharding(mesh, array.ndim, shape)
    out[key] = jax.make_array_from_process_local_data(
        placement, array, shape
    )
  return out
