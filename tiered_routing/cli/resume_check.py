"""Refuses to resume a run with settings other than the ones it trained with.

Running the train command again resumes from MODEL_DIR's newest checkpoint.
If the command changed meanwhile, two things can happen, both bad: a change
of the model's shapes (another `expert_d_ff` or sharing level) fails deep in
Orbax with hundreds of frames, and a change that keeps the shapes (another
SEED, BATCH_SIZE, learning rate or data mixture) is silently accepted, and
the run becomes half one experiment and half another. So before training,
the gin config saved with the newest checkpoint is compared, binding by
binding, with the one about to run, and every changed setting is named.

Settings that only say how long, where and how often (TRAIN_STEPS, MODEL_DIR,
checkpoint and log periods, the mesh) may change: extending a run or moving
it to another slice is normal. Settings present in only one of the two
configs (a field a newer version added) are not compared.
"""

import re
from typing import Optional

from tiered_routing.train import checkpoints

# How often a run checkpoints and logs: never what it computes (a resumed
# run ends bitwise where an uninterrupted one does, tests/train).
CADENCE_MACROS = frozenset({"SAVE_EVERY_STEPS", "LOG_EVERY_STEPS"})
CADENCE_SUFFIXES = (
    ".save_every_steps", ".log_every_steps", ".keep_checkpoints",
    ".async_checkpointing",
)
ALLOWED_MACROS = CADENCE_MACROS | {"MODEL_DIR", "TRAIN_STEPS",
                                   "CHECKPOINT_STEP"}
ALLOWED_SUFFIXES = CADENCE_SUFFIXES + (
    ".train_steps", ".restore_step", ".model_dir",
)
_BINDING = re.compile(r"^([A-Za-z_][\w.]*(?:/[\w.]+)*)\s*=\s*(.*)$")


def bindings(config_text: str) -> dict[str, str]:
  """{binding: value text} of a gin config string (continuation lines of a
  multi-line value joined; comments and imports dropped)."""
  found, name = {}, None
  for line in config_text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[0].isspace() and name is not None:
      found[name] += " " + line.strip()
      continue
    match = _BINDING.match(line)
    name = match.group(1) if match else None
    if name is not None:
      found[name] = match.group(2).strip()
  return found


def _allowed(name: str) -> bool:
  return (name in ALLOWED_MACROS or name.endswith(ALLOWED_SUFFIXES)
          or "MeshConfig." in name)


def changed_settings(saved: str, current: str) -> list[tuple[str, str, str]]:
  """(binding, saved value, current value) of every disallowed change."""
  old, new = bindings(saved), bindings(current)
  return [
      (name, old[name], new[name])
      for name in sorted(old.keys() & new.keys())
      if old[name] != new[name] and not _allowed(name)
  ]


def only_cadence_differs(saved: str, current: str) -> bool:
  """Whether two gin configs bind the same settings to the same values but
  for how often they checkpoint and log: runs of the two compute the same.

  Stricter than `changed_settings`: the length of training and the data
  and model directories count, and so does a setting bound in one only.
  """
  old, new = bindings(saved), bindings(current)
  return old.keys() == new.keys() and all(
      old[name] == new[name]
      or name in CADENCE_MACROS
      or name.endswith(CADENCE_SUFFIXES)
      for name in old
  )


def saved_config(checkpoint_dir: str) -> Optional[str]:
  """The gin config saved with the newest checkpoint, if any."""
  steps = checkpoints.complete_steps(checkpoint_dir)
  if not steps:
    return None
  with checkpoints.Checkpointer(checkpoint_dir) as ckpt:
    return ckpt.restore_metadata(steps[-1]).get("gin_config")


def check(model_dir: str, checkpoint_dir: str, current: str) -> None:
  """Raises ValueError naming every setting that differs from the run's.

  Args:
    model_dir: named in the message.
    checkpoint_dir: its checkpoints.
    current: the gin config about to run.
  """
  saved = saved_config(checkpoint_dir)
  if saved is None:
    return
  changes = changed_settings(saved, current)
  if changes:
    listed = "; ".join(f"{n}: {a} -> {b}" for n, a, b in changes)
    raise ValueError(
        f"MODEL_DIR {model_dir} holds a run trained with other settings, "
        f"and resuming it would mix two experiments: {listed}. Use a new "
        "MODEL_DIR, or pass --allow_changed_config to resume anyway.")
