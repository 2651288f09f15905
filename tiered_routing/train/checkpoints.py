"""Orbax checkpoints of the train state.

A checkpoint step holds two items (`ocp.args.Composite`):

  state:    the train state pytree (`StandardSave` / `StandardRestore`); arrays
            are written per shard, so restoring into an abstract target with
            other shardings re-lays them out onto a different mesh.
  metadata: small JSON, e.g. the data-iterator position and the operative gin
            config, needed to resume exactly where a killed run stopped.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<ts>` and renames it
when complete (on GCS it writes a commit marker instead), so a step cut short
by a kill is never listed; leftovers are deleted before a manager's
constructor returns. The metadata also holds a digest of every array
(`checkpoint_integrity`), checked on every restore: a step whose files were
damaged after it was written is refused with its step and the other complete
steps named, never restored as silently wrong values.
"""

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from tiered_routing.train import checkpoint_integrity as integrity

STATE = "state"
METADATA = "metadata"


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns."""
  step: int
  state: Any
  metadata: dict[str, Any]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs for `tree`'s leaves, with `shardings` if given.

  Args:
    tree: pytree of arrays or ShapeDtypeStructs (e.g. `jax.eval_shape`).
    shardings: optional tree of `jax.sharding.Sharding` of the same structure;
      without it the leaves' own `.sharding` (if any) is kept.
  """
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None)),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager: it never deletes unfinished saves of a live run.

  Its state handler is the PyTree one, which (unlike the Standard one)
  restores a subset of the saved tree.
  """
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                     METADATA: ocp.JsonCheckpointHandler()})


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending."""
  if "://" not in str(directory) and not os.path.isdir(directory):
    return []
  reader = _reader(str(directory))
  try:
    return sorted(reader.all_steps())
  finally:
    reader.close()


def set_aside_after(directory: str | os.PathLike, step: int) -> list[str]:
  """Renames every complete step after `step` to `<step>.set-aside[-k]`.

  Resuming from an older step (a later one is damaged, or its run went
  wrong) must not delete anything: the later steps are kept under names
  Orbax does not list as steps, so the resumed run writes fresh ones.

  Returns:
    The new paths.

  Raises:
    ValueError: if `step` is not a complete step of `directory`.
  """
  directory = str(directory)
  steps = complete_steps(directory)
  if step not in steps:
    raise ValueError(
        f"restore_step={step!r} has no complete checkpoint in {directory}; "
        f"allowed: {steps}.")
  moved = []
  for later in (s for s in steps if s > step):
    source = os.path.join(directory, str(later))
    target, k = f"{source}.set-aside", 0
    while os.path.exists(target):
      k += 1
      target = f"{source}.set-aside-{k}"
    os.rename(source, target)
    moved.append(target)
  return moved


def read_subtree(directory: str | os.PathLike, step: int, *,
                 key: str = "params",
                 target: Optional[Callable[[Any], Any]] = None) -> Any:
  """Reads one top-level field of the state saved at `step`, read-only.

  Args:
    directory: a Checkpointer's directory.
    step: a complete step (see `complete_steps`).
    key: top-level field of the saved state (a dataclass field or dict key).
    target: None restores the field as host numpy arrays with the saved
      structure; else `target(saved_metadata_tree)` returns the abstract tree
      (ShapeDtypeStructs with shardings) to restore onto, and may raise if
      the saved tree does not fit.
  """
  directory = str(directory)
  reader = _reader(directory)
  try:
    all_steps = reader.all_steps()
    with _reading(step, directory, all_steps):
      saved = reader.item_metadata(step)[STATE].tree
    if key not in saved:
      raise ValueError(
          f"key={key!r} is not a top-level field of the saved state; it has "
          f"{sorted(saved)}.")
    if target is None:
      item = {key: saved[key]}
      restore_args = jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
      item = {key: target(saved[key])}
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    with _reading(step, directory, all_steps):
      restored = reader.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(
              item=item, restore_args=restore_args, partial_restore=True),
          METADATA: ocp.args.JsonRestore()}))
    integrity.verify(
        key, restored[STATE][key],
        (restored[METADATA] or {}).get(integrity.DIGESTS_KEY),
        step=step, directory=directory, other_steps=all_steps)
  finally:
    reader.close()
  return restored[STATE][key]


@contextlib.contextmanager
def _reading(step: int, directory: str, all_steps: Iterable[int]):
  """Turns whatever Orbax and TensorStore raise reading `step` (hundreds of
  lines for a damaged chunk or manifest, a bare JSONDecodeError for damaged
  metadata) into one `CheckpointDamagedError` naming the step, the file and
  the other steps. Callers check that their target fits first (shapes),
  so what fails here is the files."""
  try:
    yield
  except integrity.CheckpointDamagedError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise integrity.damaged(
        step, directory, all_steps,
        integrity.describe_read_error(e, directory)) from e


class Checkpointer:
  """Periodic, keep-N checkpointing of a train state plus JSON metadata.

  Every process of a multi-host job must construct it and call `save` and
  `restore` at the same steps (orbax coordinates the writes).

  Usage:
    with Checkpointer(model_dir / "checkpoints", save_interval_steps=1000,
                      max_to_keep=3) as ckpt:
      if ckpt.latest_step() is not None:
        restored = ckpt.restore(abstract_state)
      ...
      ckpt.save(step, state, {"data_step": step})
  """

  def __init__(self, directory: str | os.PathLike, *,
               save_interval_steps: int = 1000,
               max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: where step directories are written (local path or gs://).
      save_interval_steps: `save` writes only steps that are multiples of
        this, unless forced; orbax also always writes the first save into an
        empty directory and saves at a preemption notice (multi-host TPU).
      max_to_keep: number of newest checkpoints kept; None keeps all.
      async_save: write in a background thread so training continues.
    """
    if save_interval_steps < 1:
      raise ValueError(
          f"save_interval_steps={save_interval_steps} must be >= 1.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(
          f"max_to_keep={max_to_keep} must be >= 1 or None (keep all).")
    self.directory = str(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        # Delete `*.orbax-checkpoint-tmp-*` leftovers of killed saves.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})
    # Orbax 0.12 deletes the leftovers on a background thread that it joins
    # only before the next save, not in `close`; a manager opened to restore
    # could exit with them half deleted. Join it here so the directory is
    # settled once the constructor returns.
    wait_for_cleanup = getattr(
        self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None:
      wait_for_cleanup()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any,
           metadata: Optional[Mapping[str, Any]] = None, *,
           force: bool = False) -> bool:
    """Saves `state` and `metadata` at `step` if the interval says so.

    With async saving, the arrays are copied to host memory before this
    returns and written in the background, so the next step may donate them.

    Args:
      step: the training step the state is *after*.
      state: pytree of (possibly sharded) arrays.
      metadata: JSON-serializable dict.
      force: save even off the interval (e.g. the final step).

    Returns:
      Whether a save was started.
    """
    metadata = {**(metadata or {}),
                integrity.DIGESTS_KEY: integrity.digests(state)}
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        METADATA: ocp.args.JsonSave(metadata),
    })
    return self._manager.save(step, args=args, force=force)

  def _check_step(self, step: Optional[int]) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(
            f"No complete checkpoint in {self.directory}.")
    elif step not in self.all_steps():
      raise ValueError(
          f"step={step} has no complete checkpoint in {self.directory}; "
          f"available: {self.all_steps()}.")
    return step

  def restore(self, abstract_state: Any, shardings: Any = None,
              step: Optional[int] = None) -> Restored:
    """Restores the state at `step` (default: latest) onto given shardings.

    Args:
      abstract_state: pytree with the structure, shapes and dtypes of the
        saved state (arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`).
      shardings: tree of shardings for the restored arrays. If None, the
        `.sharding` of the leaves of `abstract_state` is used. These may
        differ from the ones the checkpoint was written with (another mesh).
      step: which step; None for the latest.

    Returns:
      The step, the state and the metadata dict.
    """
    step = self._check_step(step)
    target = abstract_like(abstract_state, shardings)
    all_steps = self.all_steps()
    with _reading(step, self.directory, all_steps):
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(target),
          METADATA: ocp.args.JsonRestore(),
      }))
    metadata = dict(restored[METADATA] or {})
    integrity.verify_state(
        restored[STATE], metadata.pop(integrity.DIGESTS_KEY, None),
        step=step, directory=self.directory, other_steps=all_steps)
    return Restored(step, restored[STATE], metadata)

  def restore_metadata(self, step: Optional[int] = None) -> dict[str, Any]:
    """The JSON metadata saved at `step` (default: latest)."""
    step = self._check_step(step)
    with _reading(step, self.directory, self.all_steps()):
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          METADATA: ocp.args.JsonRestore()}))
    metadata = dict(restored[METADATA] or {})
    metadata.pop(integrity.DIGESTS_KEY, None)
    return metadata

  def restore_params(self, step: Optional[int] = None, *,
                     key: str = "params",
                     abstract_params: Any = None) -> Any:
    """Restores only the `key` subtree of the state (e.g. for analysis).

    The optimizer state is not read. Without `abstract_params` the subtree
    comes back as host numpy arrays with the saved structure, which needs no
    mesh or model config.

    Args:
      step: which step; None for the latest.
      key: top-level field of the saved state (a dataclass field or dict key).
      abstract_params: optional abstract tree (ShapeDtypeStructs with
        shardings) to restore onto devices instead.
    """
    target = None
    if abstract_params is not None:
      target = lambda _: abstract_like(abstract_params)
    return read_subtree(
        self.directory, self._check_step(step), key=key, target=target)

  def wait_until_finished(self) -> None:
    """Blocks until background saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
