"""Mixtures: all 16 languages, and one per partition of each scheme.

Rates use temperature sampling over example counts, r_l ∝ n_l^(1/T)
(`seqio.mixing_rate_num_examples`); T = 1/0.3 by default, the alpha = 0.3 of
mT5 (Xue et al. 2021), which up-samples low-resource languages such as si.

Names (permanent, versioned):
  tr.{source}.all_v1                    all 16, default temperature
  tr.{source}.all_t{T}_v1               all 16, temperature T
  tr.{source}.{scheme}.p{i}_v1          partition i of a scheme, e.g.
                                        tr.sample.family4.p2_v1
"""

from collections.abc import Sequence
import functools

import seqio

from tasks import mc4
from tiered_routing.data import seqio_names
from tasks import sample
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

SOURCES = ("sample", "mc4", "mc4_json")
DEFAULT_TEMPERATURE = 1 / 0.3
# Schemes registered at import; others are registered on demand by
# `partition_mixture_names`.
DEFAULT_SCHEMES = (
    *(schemes.family(n) for n in schemes.ALLOWED_NUM_PARTITIONS),
    *(schemes.random(n, seed=0) for n in (2, 4, 8)),
    schemes.per_language(),
)


def _check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f"Unknown source {source!r}; allowed: {SOURCES}")


def task_names(source: str, codes: Sequence[str]) -> list[str]:
  _check_source(source)
  return [seqio_names.task_name(source, c) for c in codes]


def _add(name: str, tasks: Sequence[str], temperature: float) -> str:
  if name not in seqio.MixtureRegistry.names():
    rate = functools.partial(
        seqio.mixing_rate_num_examples, temperature=temperature
    )
    seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])
  return name


def all_languages_mixture(source: str, temperature: float | None = None) -> str:
  """Registers (once) and names the all-16 mixture of `source`."""
  name = seqio_names.all_languages_name(source, temperature)
  if temperature is None:
    temperature = DEFAULT_TEMPERATURE
  elif temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  return _add(name, task_names(source, languages.CODES), temperature)


def partition_mixture_names(
    source: str,
    scheme: schemes.PartitionScheme,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[str]:
  """Registers (once) and names one mixture per partition of `scheme`.

  The trainer stacks one batch from each into a [P, B/P, L] batch.
  """
  _check_source(source)
  return [
      _add(
          seqio_names.partition_name(source, scheme.name, p),
          task_names(source, members),
          temperature,
      )
      for p, members in enumerate(scheme.partitions)
  ]


def register() -> None:
  """Registers the default mixtures of every source (idempotent)."""
  sample.register()
  mc4.register()
  for source in SOURCES:
    all_languages_mixture(source)
    for scheme in DEFAULT_SCHEMES:
      partition_mixture_names(source, scheme)


register()
