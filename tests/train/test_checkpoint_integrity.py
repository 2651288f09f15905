"""Damaged checkpoints are refused with the step named, never restored wrong.

Planted damage: bytes flipped or overwritten in a step's array data, its
recorded digest changed, its JSON metadata truncated, its manifest removed.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.train import checkpoint_integrity as integrity
from tiered_routing.train import checkpoints


def _state(seed):
  rng = np.random.default_rng(seed)
  return {
      "step": jnp.array(seed, jnp.int32),
      "params": {
          "w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16),
      },
      "opt_state": {"mu": jnp.asarray(rng.normal(size=(64, 256)),
                                      jnp.float32)},
  }


@pytest.fixture
def saved(tmp_path):
  """Steps 1, 2, 3 of distinct states; returns (directory, states)."""
  states = {s: _state(s) for s in (1, 2, 3)}
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1,
                                max_to_keep=None, async_save=False) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, {"data_step": step})
  return str(tmp_path), states


def _restore(directory, step=None):
  with checkpoints.Checkpointer(directory) as ckpt:
    return ckpt.restore(_state(0), step=step)


def _largest_data_file(directory, step):
  files = glob.glob(os.path.join(directory, str(step), "state", "**", "d",
                                 "*"), recursive=True)
  assert files, os.listdir(os.path.join(directory, str(step), "state"))
  return max(files, key=os.path.getsize)


def _metadata_file(directory, step):
  return os.path.join(directory, str(step), "metadata", "metadata")


def test_intact_steps_restore_bitwise_without_the_digests(saved):
  directory, states = saved
  restored = _restore(directory, step=2)
  assert integrity.DIGESTS_KEY not in restored.metadata
  assert restored.metadata == {"data_step": 2}
  for got, want in zip(jax.tree.leaves(restored.state),
                       jax.tree.leaves(states[2])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_digests_change_with_one_bit_of_one_array():
  state = _state(1)
  before = integrity.digests(state)
  w = np.asarray(state["params"]["w"]).copy()
  w.view(np.uint32)[7, 9] ^= 1
  state["params"]["w"] = jnp.asarray(w)
  after = integrity.digests(state)
  assert sorted(before) == sorted(after) == [
      "opt_state['mu']", "params['b']", "params['w']", "step"]
  changed = [k for k in before if before[k] != after[k]]
  assert changed == ["params['w']"]


@pytest.mark.parametrize("damage", ["flip_one_byte", "garbage_16k"])
def test_damaged_array_data_is_refused_naming_the_step(saved, damage):
  directory, _ = saved
  path = _largest_data_file(directory, 3)
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    if damage == "flip_one_byte":
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
    else:
      f.seek(min(size // 4, max(0, size - 16384)))
      f.write(np.random.default_rng(0).bytes(min(16384, size)))
  with pytest.raises(integrity.CheckpointDamagedError) as info:
    _restore(directory)
  message = str(info.value)
  assert f"Checkpoint step 3 in {directory} is damaged" in message
  assert "Other complete steps: [1, 2]" in message
  assert "restore_step=2" in message
  assert len(message.splitlines()) == 1
  _restore(directory, step=2)  # The intact steps still restore.


def test_a_value_that_differs_from_its_recorded_digest_is_refused(saved):
  """The digest path itself: values read back fine but are not the ones
  saved (planted by changing the recorded digest)."""
  directory, _ = saved
  path = _metadata_file(directory, 3)
  with open(path) as f:
    metadata = json.load(f)
  metadata[integrity.DIGESTS_KEY]["params['w']"] = "0" * 32
  with open(path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(integrity.CheckpointDamagedError,
                     match=r"step 3 .*array params\['w'\] does not match"):
    _restore(directory)
  # The params-only reader (evaluation, analysis) checks too.
  with pytest.raises(integrity.CheckpointDamagedError, match="params"):
    checkpoints.read_subtree(directory, 3)
  np.testing.assert_array_equal(
      checkpoints.read_subtree(directory, 2)["w"], _state(2)["params"]["w"])


def test_damaged_metadata_or_manifest_is_one_clean_error(saved):
  directory, _ = saved
  with open(_metadata_file(directory, 3), "w") as f:
    f.write('{"data_step": 3, "array_dig')
  manifests = glob.glob(os.path.join(directory, "2", "state", "**",
                                     "manifest.ocdbt"), recursive=True)
  assert manifests
  for manifest in manifests:
    os.remove(manifest)
  for step, others in ((3, "[1, 2]"), (2, "[1, 3]")):
    with pytest.raises(integrity.CheckpointDamagedError) as info:
      _restore(directory, step=step)
    message = str(info.value)
    assert f"Checkpoint step {step} in {directory} is damaged" in message
    assert f"Other complete steps: {others}" in message
    assert len(message.splitlines()) == 1


def test_checkpoints_without_digests_restore_with_a_warning(saved, caplog):
  directory, states = saved
  path = _metadata_file(directory, 3)
  with open(path) as f:
    metadata = json.load(f)
  del metadata[integrity.DIGESTS_KEY]
  with open(path, "w") as f:
    json.dump(metadata, f)
  restored = _restore(directory)
  np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                np.asarray(states[3]["params"]["w"]))
  assert "not verified" in caplog.text


def test_set_aside_after_keeps_later_steps_under_other_names(saved):
  directory, _ = saved
  with pytest.raises(ValueError, match=r"restore_step=5 .*allowed: \[1, 2, 3"):
    checkpoints.set_aside_after(directory, 5)
  moved = checkpoints.set_aside_after(directory, 1)
  assert [os.path.basename(m) for m in moved] == ["2.set-aside",
                                                  "3.set-aside"]
  assert checkpoints.complete_steps(directory) == [1]
  with checkpoints.Checkpointer(directory, save_interval_steps=1) as ckpt:
    ckpt.save(2, _state(7), force=True)  # A fresh step 2 next to the old.
  assert checkpoints.complete_steps(directory) == [1, 2]
  assert os.path.isdir(os.path.join(directory, "2.set-aside"))
