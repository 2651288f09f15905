"""Tier-1 routing: strict partitions of the 16 languages.

A `PartitionScheme` assigns every language of the study to exactly one of n
partitions. Each partition owns its own model (or its own experts) and is
trained only on its languages, so forgetting a language exactly means
retraining one partition (SISA, Bourtoule et al. 2021).

Schemes:
  * `family(n)`: contiguous blocks of the family-ordered language list, so
    n=4 is the four families, n=2 pairs families and n=8 halves them.
  * `random(n, seed)`: a seeded permutation cut into n equal blocks.
  * `per_language()`: one partition per language (n=16).
  * `custom(mapping)`: any disjoint cover of the 16 languages.
"""

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from tiered_routing.tier1 import languages

ALLOWED_NUM_PARTITIONS = (1, 2, 4, 8, 16)
SCHEME_KINDS = ("family", "random", "per_language", "custom")


@dataclasses.dataclass(frozen=True)
class PartitionScheme:
  """A disjoint cover of the study's languages by numbered partitions.

  Attributes:
    name: short stable name used in task, mixture and run names, e.g.
        "family4" or "random4s0".
    partitions: partition p's language codes, in canonical language order.
  """

  name: str
  partitions: tuple[tuple[str, ...], ...]

  def __post_init__(self):
    _validate(self.name, self.partitions)

  @property
  def num_partitions(self) -> int:
    return len(self.partitions)

  def partition_of(self, code: str) -> int:
    """The partition that owns language `code`."""
    languages.get(code)
    for p, members in enumerate(self.partitions):
      if code in members:
        return p
    raise AssertionError(f"{code!r} is in no partition of {self.name}")

  def languages_of(self, partition: int) -> tuple[str, ...]:
    """Language codes owned by `partition`."""
    if not 0 <= partition < self.num_partitions:
      raise ValueError(
          f"Partition {partition} out of range for scheme {self.name!r}"
          f" with {self.num_partitions} partitions"
      )
    return self.partitions[partition]

  def language_to_partition_table(self) -> np.ndarray:
    """int32[NUM_LANGUAGES]: partition id indexed by language id."""
    return np.array(
        [self.partition_of(c) for c in languages.CODES], dtype=np.int32
    )

  def as_dict(self) -> dict[str, int]:
    """{language code: partition id}, e.g. for JSON run metadata."""
    return {c: self.partition_of(c) for c in languages.CODES}


def _validate(name: str, partitions: Sequence[Sequence[str]]) -> None:
  """Raises a ValueError naming the first problem with a partition list."""
  if not partitions:
    raise ValueError(f"Scheme {name!r} has no partitions")
  seen: dict[str, int] = {}
  for p, members in enumerate(partitions):
    if not members:
      raise ValueError(f"Scheme {name!r}: partition {p} is empty")
    for code in members:
      languages.get(code)
      if code in seen:
        raise ValueError(
            f"Scheme {name!r}: language {code!r} is in partition "
            f"{seen[code]} and partition {p}; partitions must be "
            "disjoint"
        )
      seen[code] = p
  missing = [c for c in languages.CODES if c not in seen]
  if missing:
    raise ValueError(
        f"Scheme {name!r}: languages {missing} are in no partition; every"
        f" one of {', '.join(languages.CODES)} needs exactly one"
    )


def _check_num_partitions(kind: str, n: int) -> None:
  if n not in ALLOWED_NUM_PARTITIONS:
    raise ValueError(
        f"Scheme {kind!r} cannot split {languages.NUM_LANGUAGES} languages"
        f" into n={n!r} equal partitions; allowed n: "
        f"{ALLOWED_NUM_PARTITIONS}"
    )


def _blocks(codes: Sequence[str], n: int) -> tuple[tuple[str, ...], ...]:
  size = len(codes) // n
  return tuple(tuple(codes[i * size : (i + 1) * size]) for i in range(n))


def _canonical(codes) -> tuple[str, ...]:
  return tuple(sorted(codes, key=languages.CODES.index))


def family(num_partitions: int = 4) -> PartitionScheme:
  """Contiguous blocks of the family-ordered languages (n=4: families)."""
  _check_num_partitions("family", num_partitions)
  return PartitionScheme(
      f"family{num_partitions}", _blocks(languages.CODES, num_partitions)
  )


def random(num_partitions: int = 4, seed: int = 0) -> PartitionScheme:
  """A balanced random split: a seeded permutation cut into equal blocks."""
  _check_num_partitions("random", num_partitions)
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"random scheme seed must be an int >= 0, got {seed!r}")
  order = np.random.default_rng(seed).permutation(languages.NUM_LANGUAGES)
  codes = [languages.CODES[i] for i in order]
  blocks = _blocks(codes, num_partitions)
  return PartitionScheme(
      f"random{num_partitions}s{seed}", tuple(_canonical(b) for b in blocks)
  )


def per_language() -> PartitionScheme:
  """One partition per language, in canonical order."""
  return PartitionScheme("per_language", tuple((c,) for c in languages.CODES))


def custom(
    mapping: Mapping[str, int] | Sequence[Sequence[str]], name: str = "custom"
) -> PartitionScheme:
  """A scheme from {code: partition id} or from a list of language lists.

  Partition ids in a mapping must be 0..n-1 with none left empty.
  """
  if isinstance(mapping, Mapping):
    ids = sorted(set(mapping.values()))
    for pid in ids:
      if not isinstance(pid, (int, np.integer)) or isinstance(pid, bool):
        raise ValueError(f"Scheme {name!r}: partition id {pid!r} is not an int")
    n = max(ids) + 1 if ids else 0
    if ids and ids != list(range(n)):
      empty = sorted(set(range(n)) - set(ids))
      raise ValueError(
          f"Scheme {name!r}: partition ids must be 0..{n - 1} with none"
          f" empty; partitions {empty} are empty"
      )
    groups = [[c for c, pid in mapping.items() if pid == p] for p in range(n)]
  else:
    groups = [list(g) for g in mapping]
  _validate(name, groups)
  return PartitionScheme(name, tuple(_canonical(g) for g in groups))


def make_scheme(
    kind: str, num_partitions: int = 4, seed: int = 0, mapping=None
) -> PartitionScheme:
  """Builds a scheme by kind name; the entry point for configs."""
  if kind == "family":
    return family(num_partitions)
  if kind == "random":
    return random(num_partitions, seed)
  if kind == "per_language":
    if num_partitions != languages.NUM_LANGUAGES:
      raise ValueError(
          f"per_language has {languages.NUM_LANGUAGES} partitions, got "
          f"num_partitions={num_partitions!r}"
      )
    return per_language()
  if kind == "custom":
    if mapping is None:
      raise ValueError("Scheme 'custom' needs a mapping")
    scheme = custom(mapping)
    if scheme.num_partitions != num_partitions:
      raise ValueError(
          f"custom mapping has {scheme.num_partitions} partitions, "
          f"num_partitions={num_partitions!r}"
      )
    return scheme
  raise ValueError(f"Unknown scheme kind {kind!r}; allowed: {SCHEME_KINDS}")
