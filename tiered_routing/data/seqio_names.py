"""Permanent, versioned SeqIO task and mixture names, and mixture registration.

Names:
  tr.{source}.{code}_v1            one language, e.g. tr.sample.hi_v1
  tr.{source}.all_v1               all 16 languages, default temperature
  tr.{source}.all_t{T}_v1          all 16, temperature T
  tr.{source}.{scheme}.p{i}_v1     partition i of a scheme (or of a routing
                                   table after forgetting, e.g.
                                   tr.sample.family4-ur.p2_v1)

The `tasks` package registers the per-language tasks under these names;
mixtures are registered here, on demand, so that the library (the trade-off
sweep's reference models, whose partitions lose a language) and `tasks` (the
default mixtures) build them the same way. Mixing rates use temperature
sampling over example counts, r_l proportional to n_l^(1/T)
(`seqio.mixing_rate_num_examples`); T = 1/0.3 by default, the alpha = 0.3 of
mT5 (Xue et al. 2021), which up-samples low-resource languages such as si.
A source without example counts (`mc4_json`: gzip shards, counted only by
reading them) is sampled by the size of its training shards in bytes
instead (`mixing_rate`), the same temperature applied.
"""

from collections.abc import Sequence
import functools

import seqio
import tensorflow as tf

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

SOURCES = ("sample", "debian16", "mc4", "mc4_json")
DEFAULT_TEMPERATURE = 1 / 0.3


def check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f"Unknown source {source!r}; allowed: {SOURCES}")


def task_name(source: str, code: str) -> str:
  """e.g. tr.sample.hi_v1, tr.mc4.hi_v1, tr.mc4_json.hi_v1."""
  return f"tr.{source}.{code}_v1"


def all_languages_name(source: str, temperature: float | None = None) -> str:
  """tr.{source}.all_v1, or tr.{source}.all_t{T}_v1 for temperature T."""
  if temperature is None:
    return f"tr.{source}.all_v1"
  return f"tr.{source}.all_t{temperature:g}_v1"


def partition_name(source: str, scheme_name: str, partition: int) -> str:
  """e.g. tr.sample.family4.p2_v1."""
  return f"tr.{source}.{scheme_name}.p{partition}_v1"


def _train_bytes(task: seqio.Task) -> int:
  """Total size of a file source's training shards."""
  source = task.source
  if not isinstance(source, seqio.FileDataSource):
    raise ValueError(
        f"Task {task.name!r} has no example count and no files to size; "
        "a mixture of it needs explicit rates."
    )
  paths = source.list_shards("train")
  return sum(tf.io.gfile.stat(p).length for p in paths)


def mixing_rate(task: seqio.Task, temperature: float) -> float:
  """n^(1/T) of the task's training examples (`seqio`'s rate), or, when
  its source cannot count them, of its training shards' bytes."""
  if task.num_input_examples("train") is not None:
    return seqio.mixing_rate_num_examples(task, temperature=temperature)
  return float(_train_bytes(task)) ** (1.0 / temperature)


def register_mixture(
    name: str, tasks: Sequence[str], temperature: float = DEFAULT_TEMPERATURE
) -> str:
  """Registers (once) a temperature-sampled mixture of `tasks`; its name.

  The tasks must be registered (import `tasks`, e.g. from a gin file).
  """
  if name not in seqio.MixtureRegistry.names():
    missing = [t for t in tasks if t not in seqio.TaskRegistry.names()]
    if missing:
      raise ValueError(
          f"Mixture {name!r} needs tasks {missing}, which are not "
          "registered; import the `tasks` package first (gin files do it "
          "with gin/runs/tasks.gin)."
      )
    rate = functools.partial(mixing_rate, temperature=temperature)
    seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])
  return name


def all_languages_mixture(source: str, temperature: float | None = None) -> str:
  """Registers (once) and names the all-16 mixture of `source`."""
  check_source(source)
  name = all_languages_name(source, temperature)
  if temperature is None:
    temperature = DEFAULT_TEMPERATURE
  elif temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  tasks = [task_name(source, c) for c in languages.CODES]
  return register_mixture(name, tasks, temperature)


def language_mixture(
    source: str,
    table_name: str,
    partition: int,
    codes: Sequence[str],
    temperature: float = DEFAULT_TEMPERATURE,
) -> str:
  """Registers (once) and names partition `partition`'s mixture of `codes`."""
  check_source(source)
  tasks = [task_name(source, c) for c in codes]
  name = partition_name(source, table_name, partition)
  return register_mixture(name, tasks, temperature)


def partition_mixture_names(
    source: str,
    scheme: schemes.PartitionScheme,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[str]:
  """Registers (once) and names one mixture per partition of `scheme`.

  The trainer stacks one batch from each into a [P, B/P, L] batch.
  """
  return [
      language_mixture(source, scheme.name, p, members, temperature)
      for p, members in enumerate(scheme.partitions)
  ]
