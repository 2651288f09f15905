"""Exact unlearning by SISA bookkeeping over strict partitions.

With strict tier-1 partitions (sharing 'none'), a language only ever reached
the parameters of the partition that owns it, so forgetting it exactly means
retraining that one partition from scratch without it (SISA, Bourtoule et al.
2021, "Machine Unlearning", Sec. IV). If the language was the partition's
only one, there is nothing to retrain: the partition is dropped. Either way
the forgotten language becomes unroutable: tier 1 no longer sends it
anywhere, and a system that must still answer such inputs has to pick a
fallback explicitly.

This module only does the bookkeeping: which partition owns a language, the
retain mixture of the retrained partition (as task names from a caller's
function, since `tiered_routing` never imports `tasks`) and the routing table
after forgetting. A `RoutingTable` keeps partition ids stable (a dropped
partition stays as an empty slot), so checkpoints indexed by partition stay
valid, and it can forget again.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

UNROUTABLE = -1
ACTIONS = ("retrain", "drop")


@dataclasses.dataclass(frozen=True)
class RoutingTable:
  """Tier-1 routing of a partition scheme after forgetting languages.

  Attributes:
    name: e.g. 'family4-ur' (the scheme's name and the forgotten codes).
    partitions: languages each partition id serves; () = dropped partition.
    forgotten: codes no partition serves any more, in forgetting order.
  """

  name: str
  partitions: tuple[tuple[str, ...], ...]
  forgotten: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.partitions:
      raise ValueError(f"Routing table {self.name!r} has no partitions.")
    seen = {}
    for where, codes in [
        (f"partition {p}", c) for p, c in enumerate(self.partitions)
    ] + [("forgotten", self.forgotten)]:
      for code in codes:
        languages.get(code)
        if code in seen:
          raise ValueError(
              f"Routing table {self.name!r}: language {code!r} "
              f"is in {seen[code]} and in {where}."
          )
        seen[code] = where
    missing = [c for c in languages.CODES if c not in seen]
    if missing:
      raise ValueError(
          f"Routing table {self.name!r}: languages {missing} are "
          "neither served nor forgotten."
      )

  @classmethod
  def from_scheme(
      cls, scheme: schemes.PartitionScheme
  ) -> "RoutingTable":
    return cls(scheme.name, scheme.partitions)

  @property
  def num_partitions(self) -> int:
    return len(self.partitions)

  @property
  def dropped_partitions(self) -> tuple[int, ...]:
    return tuple(p for p, codes in enumerate(self.partitions) if not codes)

  def is_routable(self, code: str) -> bool:
    languages.get(code)
    return code not in self.forgotten

  def partition_of(self, code: str) -> int:
    """The partition serving `code`; a ValueError if it was forgotten."""
    if not self.is_routable(code):
      raise ValueError(
          f"Language {code!r} was forgotten from {self.name!r} "
          "and is unroutable."
      )
    return next(p for p, codes in enumerate(self.partitions) if code in codes)

  def language_to_partition_table(self) -> np.ndarray:
    """int32[NUM_LANGUAGES]: partition id per language id, UNROUTABLE = -1."""
    return np.array(
        [
            self.partition_of(c) if self.is_routable(c) else UNROUTABLE
            for c in languages.CODES
        ],
        np.int32,
    )

  def as_dict(self) -> dict[str, int]:
    """{code: partition id or UNROUTABLE} for run metadata."""
    table = self.language_to_partition_table()
    return {c: int(table[i]) for i, c in enumerate(languages.CODES)}


SchemeOrTable = Union[schemes.PartitionScheme, RoutingTable]


def _as_table(scheme: SchemeOrTable) -> RoutingTable:
  if isinstance(scheme, schemes.PartitionScheme):
    return RoutingTable.from_scheme(scheme)
  if isinstance(scheme, RoutingTable):
    return scheme
  raise ValueError(
      f"Expected a PartitionScheme or RoutingTable, got "
      f"{type(scheme).__name__}."
  )


def owning_partitions(scheme: SchemeOrTable, code: str) -> tuple[int, ...]:
  """Partitions whose parameters saw `code` (one, for strict partitions)."""
  return (_as_table(scheme).partition_of(code),)


def retain_languages(scheme: SchemeOrTable, code: str) -> tuple[str, ...]:
  """The owning partition's languages without `code`: its retrain data."""
  table = _as_table(scheme)
  return tuple(
      c for c in table.partitions[table.partition_of(code)] if c != code
  )


def retain_mixture(
    scheme: SchemeOrTable, code: str, task_name: Callable[[str], str]
) -> tuple[str, ...]:
  """Task names of the retrained partition's training mixture.

  Args:
    scheme: the current scheme or routing table.
    code: the language to forget.
    task_name: maps a language code to its task name, e.g.
      `lambda c: f"tr.sample.{c}_v1"`.

  Returns:
    One task per retained language of the partition; () if the partition
    held only `code` (drop it instead).
  """
  names = tuple(task_name(c) for c in retain_languages(scheme, code))
  for name in names:
    if not isinstance(name, str) or not name:
      raise ValueError(
          f"task_name returned {name!r}; expected a non-empty "
          "task name string."
      )
  if len(set(names)) != len(names):
    raise ValueError(f"task_name returned duplicate task names {names}.")
  return names


def drop_partition(scheme: SchemeOrTable, code: str) -> RoutingTable:
  """The routing table after forgetting `code`.

  The owning partition keeps serving its other languages (after it is
  retrained on them) or, if `code` was all it held, becomes an empty
  (dropped) slot; `code` becomes unroutable. Other partitions keep their
  ids and languages.
  """
  table = _as_table(scheme)
  p = table.partition_of(code)
  parts = list(table.partitions)
  parts[p] = tuple(c for c in parts[p] if c != code)
  return RoutingTable(
      f"{table.name}-{code}", tuple(parts), table.forgotten + (code,)
  )


@dataclasses.dataclass(frozen=True)
class ExactPlan:
  """What exact unlearning of one language has to do.

  Attributes:
    forget_language: the code to forget.
    partition: the owning partition.
    action: 'retrain' the partition on `retain_tasks`, or 'drop' it.
    retain_languages: the partition's remaining languages.
    retain_tasks: their task names (empty for 'drop').
    routing: the routing table afterwards.
  """

  forget_language: str
  partition: int
  action: str
  retain_languages: tuple[str, ...]
  retain_tasks: tuple[str, ...]
  routing: RoutingTable


def plan(
    scheme: SchemeOrTable, code: str, task_name: Callable[[str], str]
) -> ExactPlan:
  """Bookkeeping for forgetting `code` exactly (see `ExactPlan`)."""
  (partition,) = owning_partitions(scheme, code)
  retained = retain_languages(scheme, code)
  return ExactPlan(
      forget_language=code,
      partition=partition,
      action="retrain" if retained else "drop",
      retain_languages=retained,
      retain_tasks=retain_mixture(scheme, code, task_name),
      routing=drop_partition(scheme, code),
  )


def forget_all(scheme: SchemeOrTable, codes: Sequence[str]) -> RoutingTable:
  """The routing table after forgetting several languages in order."""
  table = _as_table(scheme)
  for code in codes:
    table = drop_partition(table, code)
  return table
