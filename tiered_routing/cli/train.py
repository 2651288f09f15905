r"""Trains a TieredDecoder from gin files (T5X-style flags).

Quickstart (tiny model, embedded corpus, 2 CPU cores, a few minutes):

  python -m tiered_routing.train --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'"

Required macros (usually from gin/runs/pretrain.gin plus a model and an
experiment file): MODEL_DIR, MIXTURE_OR_TASK_NAME (one mixture per partition;
pretrain.gin derives it from DATA_SOURCE and the partition scheme),
TRAIN_STEPS, BATCH_SIZE, TASK_FEATURE_LENGTHS. Running the same command again
resumes from the newest checkpoint in MODEL_DIR; a second job on a MODEL_DIR
that is in use refuses to start, and so does a resume whose gin config
changes what the run trains (`resume_check`; --allow_changed_config
overrides). The operative config is written to MODEL_DIR/config.gin. On a
TPU pod slice run it on every host with --multi_host (see
scripts/launch_tpu.sh).
"""

import os
from typing import Any, Mapping, Optional

from absl import flags
from absl import logging
import gin
import jax

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import resume_check
from tiered_routing.cli import user_errors
from tiered_routing.data import host_shards
from tiered_routing.data import pipeline
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import schemes
from tiered_routing.train import model_dir_lock
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state
from tiered_routing.train import trainer

FLAGS = flags.FLAGS
_ALLOW_CHANGED_CONFIG = flags.DEFINE_bool(
    "allow_changed_config", False,
    "Resume MODEL_DIR even if the gin config changes settings other than "
    "its length, periods and mesh (cli/resume_check.py).")
REQUIRED_MACROS = (
    "MODEL_DIR",
    "MIXTURE_OR_TASK_NAME",
    "TRAIN_STEPS",
    "BATCH_SIZE",
    "TASK_FEATURE_LENGTHS",
)


def _validate(
    model_config, scheme, batch_size, train_config, names, task_feature_lengths
):
  """Checks that the pieces fit; returns (mixture names, [P, B/P, L])."""
  p = model_config.num_partitions
  if scheme.num_partitions != p:
    raise ValueError(
        f"The partition scheme {scheme.name!r} has {scheme.num_partitions} "
        f"partitions but the model has num_partitions={p}; set "
        "NUM_PARTITIONS once for both."
    )
  if batch_size % p:
    raise ValueError(
        f"BATCH_SIZE={batch_size} must be a multiple of num_partitions={p}."
    )
  if (batch_size // p) % train_config.num_microbatches:
    raise ValueError(
        f"num_microbatches={train_config.num_microbatches} must divide the "
        f"per-partition batch BATCH_SIZE / P = {batch_size // p}."
    )
  length = gin_flags.task_feature_length(task_feature_lengths)
  return gin_flags.mixture_names(names, p), (p, batch_size // p, length)


def _check_resume(model_dir: str) -> None:
  """`resume_check.check` unless --allow_changed_config."""
  if not (FLAGS.is_parsed() and _ALLOW_CHANGED_CONFIG.value):
    resume_check.check(
        model_dir, os.path.join(model_dir, "checkpoints"),
        gin.operative_config_str())


@gin.configurable("train", module="train_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: Any = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    train_config: steps.TrainConfig = gin.REQUIRED,
    optimizer_config: Optional[optimizers.OptimizerConfig] = None,
    mesh_config: Optional[sharding.MeshConfig] = None,
    data_seed: int = 0,
    pack: bool = True,
    input_row_shards: Optional[int] = None,
) -> train_state.TrainState:
  """Builds data, mesh and model from the arguments (gin); returns the state.

  Args:
    model_dir: run directory (MODEL_DIR).
    mixture_or_task_name: one SeqIO mixture per partition.
    task_feature_lengths: {'targets': L}.
    batch_size: global batch B (B/P rows per partition).
    scheme: tier-1 partition scheme (language -> partition).
    model_config: the decoder.
    train_config: losses and loop.
    optimizer_config: the optimizer (default OptimizerConfig()).
    mesh_config: mesh axis sizes (default: all devices on 'data').
    data_seed: shuffling and mixing seed (partition p uses data_seed + p).
    pack: pack several sequences per row.
    input_row_shards: row shards per partition (`data.host_shards`; None
      = as many as split its rows among the processes). The data order
      depends on it: reuse a multi-process run's value to reproduce it.
  """
  names, batch_shape = _validate(
      model_config,
      scheme,
      batch_size,
      train_config,
      mixture_or_task_name,
      task_feature_lengths,
  )
  # Lock before touching anything in model_dir (config.gin included).
  with model_dir_lock.ModelDirLock(model_dir):
    _check_resume(model_dir)
    mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
    block = host_shards.host_block(mesh, batch_shape, input_row_shards)
    dataset = _host_dataset(names, batch_size, block, data_seed, pack)
    logging.info("Mesh %s; mixtures %s", dict(mesh.shape), names)
    return trainer.train(
        model_dir=model_dir,
        model_config=model_config,
        optimizer_config=optimizer_config or optimizers.OptimizerConfig(),
        config=train_config,
        batches=lambda start: pipeline.batch_iterator(dataset, start),
        batch_shape=batch_shape,
        mesh=mesh,
        metadata={"gin_config": gin_flags.write_config(model_dir)},
        lock_model_dir=False,
        host_block=block,
    )


def _host_dataset(names, batch_size, block, data_seed, pack):
  """This process's block of every batch (`data.host_shards`)."""
  logging.info(
      "This process reads partitions %s, row shards %s of %d.",
      block.partitions, block.row_shards, block.num_row_shards,
  )
  return pipeline.partitioned_dataset(
      names,
      global_batch_size=batch_size,
      block=block,
      sequence_length=block.global_shape[2],
      seed=data_seed,
      pack=pack,
  )


def main(argv):
  gin_flags.maybe_initialize_distributed()
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  logging.info(
      "Devices: %d (%d local) on %d processes",
      jax.device_count(),
      jax.local_device_count(),
      jax.process_count(),
  )
  run()


if __name__ == "__main__":
  user_errors.run(main)
