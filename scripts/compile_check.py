r"""Compile-only check of full-size configs on simulated device meshes.

Lowers and compiles the trainer's `train_step` (forward, backward, AdamW)
with the state and batch sharded by the logical-axis rules, for every
(model, device count, mesh layout), without allocating a single parameter:
the state is `jax.eval_shape`d and passed as ShapeDtypeStructs carrying
their shardings. Devices are simulated CPU devices
(`--xla_force_host_platform_device_count`, set here before jax is
imported), so this runs anywhere; the per-device memory comes from the
compiled program's `memory_analysis()` and from the shard shapes, split
into parameters, optimizer state, batch and temporaries (activations kept
for the backward pass, gradients, workspace).

Caveat: buffer assignment is the CPU compiler's. A TPU compile fuses and
lays out differently, so treat the temporaries as an estimate (usually an
upper bound: CPU does not rematerialize to fit a memory limit).

  python scripts/compile_check.py --models=n1,n16 --devices=16,64 \
      --output_dir=/tmp/compile_check
"""

import os
import re
import sys


def _requested_devices(argv) -> int:
  """Largest --devices entry (default 64), read before jax starts."""
  value = "16,64"
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      value = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
  try:
    return max(int(v) for v in value.split(",") if v)
  except ValueError:
    return 64  # absl reports the malformed flag later.


_flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+",
    "",
    os.environ.get("XLA_FLAGS", ""),
)
os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count="
    f"{_requested_devices(sys.argv)}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import math
import time

from absl import app
from absl import flags
import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from tiered_routing import sharding
from tiered_routing.cli import benchmark_timing
from tiered_routing.cli import configurables
from tiered_routing.cli import gin_flags
from tiered_routing.data import pipeline
from tiered_routing.model import param_count
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state

# pylint: enable=g-import-not-at-top,wrong-import-position

GIB = 2**30
# HBM per chip (GiB). Slice names count TensorCores for v4/v5p (2 per chip:
# v4-32 has 16 chips) and chips for v5e (v5litepod-16 has 16).
TPU_HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95}
COLUMNS = tuple(
    "model devices mesh dispatch dtype batch length total_params_M params_gib"
    " opt_state_gib batch_gib temp_gib peak_gib fits compile_s".split()
)

_MODELS = flags.DEFINE_list(
    "models", ["n1", "n16"], "Model gin files (gin/models/<name>.gin)."
)
_DEVICES = flags.DEFINE_list("devices", ["16", "64"], "Mesh sizes.")
_LAYOUTS = flags.DEFINE_list(
    "layouts",
    ["auto"],
    "Mesh layouts: 'auto' (partition = n, the rest 'data'), 'expert<k>' (like"
    " auto but k-way 'expert' parallelism inside a partition), or explicit "
    "'P:D:E:M' axis sizes (-1 = the rest).",
)
_BATCH = flags.DEFINE_integer(
    "rows_per_data_shard",
    8,
    "Sequences per (partition x data) shard; the global batch is this times"
    " partition * data.",
)
_LENGTH = flags.DEFINE_integer("length", 1024, "Sequence length L.")
_DISPATCH = flags.DEFINE_string(
    "dispatch", "sort_gather", "Dispatch impl compiled (see bench_moe)."
)
_LAYERS = flags.DEFINE_integer(
    "num_layers",
    None,
    "Override the number of layers (to reduce compile time; rows are "
    "labelled).",
)
# --output_dir (gin_flags'): writes compile_check.csv / .md.
_OUTPUT_DIR = gin_flags.OUTPUT_DIR


def load_model_config(name: str):
  """DecoderConfig of gin/models/<name>.gin (plus --gin_bindings)."""
  path = os.path.join(gin_flags.REPO_ROOT, "gin", "models", f"{name}.gin")
  if not os.path.exists(path):
    raise ValueError(f"--models: no gin file {path} for model {name!r}.")
  gin.clear_config()
  # --gin_bindings is gin_flags' flag (the binaries'), applied to every model.
  bindings = [f"DISPATCH = {_DISPATCH.value!r}"] + list(
      flags.FLAGS.gin_bindings
  )
  if _LAYERS.value:
    bindings.append(
        f"tiered_routing.DecoderConfig.num_layers = {_LAYERS.value}"
    )
  gin.parse_config_files_and_bindings([path], bindings)
  return configurables.DecoderConfig()


def mesh_config(layout: str, n: int, devices: int) -> sharding.MeshConfig:
  """MeshConfig for a layout name (see --layouts)."""
  if devices % n:
    raise ValueError(
        f"{devices} devices cannot hold n={n} partitions evenly; use a "
        "multiple of n."
    )
  if layout == "auto":
    return sharding.MeshConfig(partition=n, data=-1)
  if layout.startswith("expert"):
    k = int(layout[len("expert") :])
    return sharding.MeshConfig(partition=n, data=-1, expert=k)
  sizes = [int(v) for v in layout.split(":")]
  if len(sizes) != 4:
    raise ValueError(
        f"layout {layout!r}: need 'auto', 'expert<k>' or 'P:D:E:M'."
    )
  return sharding.MeshConfig(*sizes)


def _per_device_bytes(abstract_tree, shardings) -> int:
  total = 0
  for leaf, placement in zip(
      jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)
  ):
    shard = placement.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def _abstract_batch(mesh, shape):
  out = {}
  for key in pipeline.MODEL_FEATURES:
    placement = sharding.batch_sharding(mesh, len(shape), shape)
    out[key] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=placement)
  return out


def compile_case(name: str, model_config, devices: int, layout: str) -> dict:
  """Compiles train_step for one case; returns the table row."""
  mc = mesh_config(layout, model_config.num_partitions, devices)
  mesh = sharding.make_mesh(mc, jax.devices()[:devices])
  p = model_config.num_partitions
  data = mesh.shape["partition"] * mesh.shape["data"]
  batch = _BATCH.value * data
  shape = (p, batch // p, _LENGTH.value)
  config = steps.TrainConfig(train_steps=100_000)
  s = train_state.setup(
      model_config,
      optimizers.OptimizerConfig(),
      config.train_steps,
      mesh,
      shape,
  )
  with_sharding = lambda a, sh: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=sh
  )
  state = jax.tree.map(with_sharding, s.abstract_state, s.shardings)
  abstract_batch = _abstract_batch(mesh, shape)
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  step = jax.jit(
      functools.partial(
          steps.train_step,
          objective=steps.LmObjective(s.model, config),
          tx=s.tx,
      ),
      out_shardings=(s.shardings, replicated),
      donate_argnums=0,
  )
  start = time.perf_counter()
  with sharding.with_sharding_rules(mesh):
    compiled = step.lower(state, abstract_batch, rng).compile()
  compile_s = time.perf_counter() - start
  row = _row(model_config, mesh, shape, s, abstract_batch, compiled)
  return dict(row, model=name, compile_s=compile_s)


def _row(model_config, mesh, shape, s, abstract_batch, compiled):
  stats = compiled.memory_analysis()
  params_b = _per_device_bytes(s.abstract_state.params, s.shardings.params)
  opt_b = _per_device_bytes(s.abstract_state.opt_state, s.shardings.opt_state)
  batch_b = _per_device_bytes(
      abstract_batch, [a.sharding for a in jax.tree.leaves(abstract_batch)]
  )
  # Donated state buffers are reused for the new state (alias), so the live
  # peak is arguments + temporaries + the outputs that are not aliased.
  peak = (
      stats.argument_size_in_bytes
      + stats.temp_size_in_bytes
      + stats.output_size_in_bytes
      - stats.alias_size_in_bytes
  )
  fits = [name for name, hbm in TPU_HBM_GIB.items() if peak < hbm * GIB]
  sizes = "x".join(str(mesh.shape[a]) for a in sharding.MESH_AXES)
  return dict(
      devices=mesh.size,
      mesh=f"{sizes} (P x D x E x M)",
      dispatch=model_config.dispatch,
      dtype=model_config.dtype,
      batch=shape[0] * shape[1],
      length=shape[2],
      total_params_M=param_count.count_params(model_config).total / 1e6,
      params_gib=params_b / GIB,
      opt_state_gib=opt_b / GIB,
      batch_gib=batch_b / GIB,
      temp_gib=stats.temp_size_in_bytes / GIB,
      peak_gib=peak / GIB,
      fits=",".join(fits) or "none",
      argument_gib=stats.argument_size_in_bytes / GIB,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  devices = [int(d) for d in _DEVICES.value]
  if max(devices) > jax.device_count():
    raise app.UsageError(
        f"--devices={devices} exceeds the {jax.device_count()}"
        " simulated devices."
    )
  layers_note = (
      f"; num_layers overridden to {_LAYERS.value}" if _LAYERS.value else ""
  )
  header = (
      f"compile_check: {benchmark_timing.machine_description()}\n"
      f"steps.train_step (AdamW, LM objective; float32 parameters and moments)"
      f"{layers_note}; per-device bytes; fits = peak < HBM of "
      f"{TPU_HBM_GIB} GiB\ncommand: {' '.join(sys.argv)}"
  )
  print(header)
  print(benchmark_timing.text_table([], COLUMNS), flush=True)
  rows = []
  for name in _MODELS.value:
    config = load_model_config(name)
    label = name + (f" ({config.num_layers} layers)" if _LAYERS.value else "")
    for n_dev in devices:
      for layout in _LAYOUTS.value:
        rows.append(compile_case(label, config, n_dev, layout))
        print(
            benchmark_timing.text_table(rows[-1:], COLUMNS).splitlines()[-1],
            flush=True,
        )
  print("\n" + benchmark_timing.text_table(rows, COLUMNS))
  for path in benchmark_timing.write_outputs(
      _OUTPUT_DIR.value,
      "compile_check",
      rows,
      COLUMNS,
      header.replace("\n", "  \n"),
  ):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
