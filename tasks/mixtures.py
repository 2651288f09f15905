"""The default mixtures: all 16 languages, and one per partition of each scheme.

Names and rates are the library's (`tiered_routing.data.seqio_names`):
  tr.{source}.all_v1                    all 16, default temperature
  tr.{source}.{scheme}.p{i}_v1          partition i of a scheme, e.g.
                                        tr.sample.family4.p2_v1
Other temperatures and schemes are registered on demand by
`seqio_names.all_languages_mixture` and `seqio_names.partition_mixture_names`
(gin files call the latter).
"""

from tasks import mc4
from tasks import embedded
from tiered_routing.data import seqio_names
from tiered_routing.tier1 import schemes

# Schemes registered at import.
DEFAULT_SCHEMES = (
    *(schemes.family(n) for n in schemes.ALLOWED_NUM_PARTITIONS),
    *(schemes.random(n, seed=0) for n in (2, 4, 8)),
    schemes.per_language(),
)


def register() -> None:
  """Registers the tasks and default mixtures of every source (idempotent)."""
  for source in embedded.SOURCES:
    embedded.register(source)
  mc4.register()
  for source in seqio_names.SOURCES:
    seqio_names.all_languages_mixture(source)
    for scheme in DEFAULT_SCHEMES:
      seqio_names.partition_mixture_names(source, scheme)


register()
