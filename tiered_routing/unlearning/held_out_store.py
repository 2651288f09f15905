"""A sweep's held-out rows, built once and kept in its output directory.

Every model of a sweep is scored on the same per-language held-out rows
(`stream_cache.DataCache.validation_rows`), and gradient methods stop on
rows of another split. Building them runs one SeqIO pipeline per language
and split (1.5 s each in a profile of the mC4-sources sweep test, mostly
tracing tf.data maps). They do not depend on the training seed, the
configuration or the process, yet each seed's data cache, each `--workers`
process and each resumed run rebuilt all of them.
`HeldOutRows` keeps them as .npz files next to the sweep's other outputs:
the first process to need a language's rows builds and writes them, every
later one reads them. Like `baselines.json`, they belong to the sweep
recorded in `sweep.json`, whose manifest refuses a rerun with other data
settings.
"""

from collections.abc import Iterator, Mapping, MutableMapping
import os

import numpy as np

from tiered_routing.train import atomic_file

Rows = dict[str, np.ndarray]
Key = tuple[str, str]  # (language code, split)


class HeldOutRows(MutableMapping[Key, Rows]):
  """{(language code, split): rows}, each an .npz file in `directory`.

  Writes are atomic (`atomic_file`), so two processes that build the same
  rows at once leave one whole file, and a killed process leaves no half
  file under a rows' name (at most a `.tmp_` file, which is ignored).
  Rows read or written are also kept in memory.

  Args:
    directory: the store's folder, created on the first write.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._memory: dict[Key, Rows] = {}

  def _path(self, key: Key) -> str:
    code, split = key
    return os.path.join(self.directory, f"{split}.{code}.npz")

  def __contains__(self, key: object) -> bool:
    return key in self._memory or (
        isinstance(key, tuple) and len(key) == 2
        and os.path.exists(self._path(key)))

  def __getitem__(self, key: Key) -> Rows:
    if key not in self._memory:
      if not os.path.exists(self._path(key)):
        raise KeyError(key)
      with np.load(self._path(key)) as saved:
        self._memory[key] = {name: saved[name] for name in saved.files}
    return self._memory[key]

  def __setitem__(self, key: Key, rows: Mapping[str, np.ndarray]) -> None:
    rows = {name: np.asarray(value) for name, value in rows.items()}
    with atomic_file.replacing(self._path(key), "wb") as f:
      np.savez(f, **rows)
    self._memory[key] = rows

  def __delitem__(self, key: Key) -> None:
    if key not in self:
      raise KeyError(key)
    self._memory.pop(key, None)
    if os.path.exists(self._path(key)):
      os.remove(self._path(key))

  def __iter__(self) -> Iterator[Key]:
    on_disk = set()
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        parts = name.split(".")
        if len(parts) == 3 and parts[2] == "npz":
          on_disk.add((parts[1], parts[0]))
    return iter(sorted(on_disk | set(self._memory)))

  def __len__(self) -> int:
    return sum(1 for _ in self)
