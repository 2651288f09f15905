"""SeqIO tasks and mixtures of tiered_routing.

Importing this package (e.g. from a gin file: `import tasks`) registers every
per-language task of the three sources and the default mixtures. The library
(`tiered_routing`) never imports it.
"""

from tasks import mixtures  # pylint: disable=unused-import
