r"""Training throughput (tokens/s) across sharing levels and partition counts.

For each model family, sharing level ('none', 'attention', 'all') and number
of tier-1 partitions n, the trainer's own `train_step` (AdamW, partition-wise
clipping, router losses) is compiled and timed on synthetic [P, B/P, L]
batches already on the device, so the figure is the model's speed alone. The
input pipeline (SeqIO on the embedded sample corpus, packed, plus the copy to
the device) is timed separately per batch; it runs in parallel with training
(prefetch), so it costs nothing as long as it is faster than a step.

Families keep the *total* parameter count of their n = 1 member for every n
and sharing level, the way gin/models/n*.gin do at full size: the number of
experts in all partitions is fixed (E/n per partition), every expert keeps
d_model * expert_d_ff, and d_model (with the number of heads and the dense
d_ff) is chosen so the total matches within a few percent.

  python scripts/bench_train.py --preset=quick --output_dir=/tmp/bench_train
  python scripts/bench_train.py --families=small --partitions=1,16 \
      --sharing=none --steps=5
"""

import dataclasses
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

import tasks  # pylint: disable=unused-import  (registers the SeqIO tasks)
from tiered_routing import sharding
from tiered_routing.cli import benchmark_timing
from tiered_routing.data import pipeline
from tiered_routing.data import seqio_names
from tiered_routing.model import decoder_config
from tiered_routing.model import param_count
from tiered_routing.tier1 import schemes
from tiered_routing.train import optimizers
from tiered_routing.train import steps as steps_lib
from tiered_routing.train import train_state

# pylint: enable=g-import-not-at-top,wrong-import-position

SHARING = decoder_config.SHARING_LEVELS
VOCAB_SIZE = 4096  # The embedded SentencePiece vocabulary of the sample data.

# n = 1 members. 'tiny' has the widths of gin/models/tiny.gin, but 32 experts
# in all so that n = 16 still has top_k = 2 experts per partition.
FAMILIES = {
    "tiny": dict(
        model=decoder_config.DecoderConfig(
            vocab_size=VOCAB_SIZE,
            d_model=64,
            num_heads=4,
            head_dim=16,
            num_layers=2,
            d_ff=128,
            moe_every=2,
            num_experts=32,
            expert_d_ff=64,
            group_size=256,
        ),
        batch_size=32,
        length=128,
    ),
    "small": dict(
        model=decoder_config.DecoderConfig(
            vocab_size=VOCAB_SIZE,
            d_model=512,
            num_heads=8,
            head_dim=64,
            num_layers=4,
            moe_every=1,
            num_experts=64,
            expert_d_ff=64,
            group_size=4096,
        ),
        batch_size=32,
        length=256,
    ),
}
SETTINGS = (
    "families",
    "partitions",
    "sharing",
    "steps",
    "batch_size",
    "length",
)
PRESETS = {  # Values of SETTINGS; None = the family's own batch and length.
    "smoke": (["tiny"], [2], ["none"], 1, 4, 16),  # The test's run.
    "quick": (["tiny"], [1, 4, 16], SHARING, 5, None, None),
    "full": (["tiny", "small"], [1, 4, 16], SHARING, 10, None, None),
}
COLUMNS = tuple(
    "family sharing partitions d_model experts_per_part expert_d_ff"
    " total_params_M total_vs_n1 active_params_M batch length step_ms"
    " tokens_per_s input_ms input_over_step compile_s".split()
)

_PRESET = flags.DEFINE_enum(
    "preset",
    "quick",
    list(PRESETS),
    "Default sweep; the flags below override it.",
)
_FAMILIES = flags.DEFINE_list("families", None, f"From {list(FAMILIES)}.")
_PARTITIONS = flags.DEFINE_list("partitions", None, "Numbers of partitions n.")
_SHARING = flags.DEFINE_list("sharing", None, f"Sharing levels {SHARING}.")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (median).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 1, "Untimed steps first.")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Global batch B (default: the family's)."
)
_LENGTH = flags.DEFINE_integer(
    "length", None, "Sequence length L (default: the family's)."
)
_DISPATCH = flags.DEFINE_string("dispatch", "auto", "Dispatch impl.")
_INPUT = flags.DEFINE_bool(
    "input_pipeline", True, "Also time the SeqIO input pipeline."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Writes bench_train.csv and bench_train.md."
)


def _setting(name):
  """The flag's value if given on the command line, else the preset's."""
  flag = flags.FLAGS[name]
  if flag.present:
    return flag.value
  return PRESETS[_PRESET.value][SETTINGS.index(name)]


def scaled_config(
    base: decoder_config.DecoderConfig, n: int, sharing: str, d_model: int
) -> decoder_config.DecoderConfig:
  """The family member with n partitions and the given d_model.

  Experts per partition are base.num_experts / n; the expert width keeps
  d_model * expert_d_ff; heads (of base.head_dim) and the dense d_ff scale
  with d_model.
  """
  if base.num_experts % n or base.num_experts // n < base.top_k:
    raise ValueError(
        f"n={n} partitions do not split the family's "
        f"{base.num_experts} experts into groups of at least "
        f"top_k={base.top_k}."
    )
  scale = d_model / base.d_model
  return dataclasses.replace(
      base,
      num_partitions=n,
      sharing=sharing,
      d_model=d_model,
      num_experts=base.num_experts // n,
      num_heads=max(1, round(base.num_heads * scale)),
      expert_d_ff=max(1, round(base.expert_d_ff / scale)),
      d_ff=round(base.d_ff * scale),
      dispatch=_DISPATCH.value,
  )


@functools.lru_cache(maxsize=None)
def _count(config: decoder_config.DecoderConfig) -> param_count.ParamCount:
  return param_count.count_params(config)  # Traces the model: ~1 s.


def _total(config: decoder_config.DecoderConfig) -> int:
  return _count(config).total


def equal_total_config(base, n, sharing):
  """The member whose total (multiple-of-8 d_model) is closest to base's."""
  if n == 1:  # Every sharing level is the same model for one partition.
    return scaled_config(base, 1, sharing, base.d_model)
  target = _total(scaled_config(base, 1, sharing, base.d_model))
  total = lambda d: _total(scaled_config(base, n, sharing, d))
  # In units of 8. More partitions never need a wider model: the experts'
  # total is fixed and each partition adds its own copy of the rest.
  lo, hi = 1, base.d_model // 8
  while lo < hi:  # The total grows with d_model.
    mid = (lo + hi) // 2
    lo, hi = (mid + 1, hi) if total(8 * mid) < target else (lo, mid)
  best = min((8 * lo, 8 * max(1, lo - 1)), key=lambda d: abs(total(d) - target))
  return scaled_config(base, n, sharing, best)


def synthetic_batch(p, b, length, vocab_size, seed=0):
  """A [P, B/P, L] batch of MODEL_FEATURES: random tokens, one sequence/row."""
  rng = np.random.default_rng(seed)
  shape = (p, b // p, length)
  tokens = rng.integers(1, vocab_size, shape, dtype=np.int32)
  return {
      "decoder_input_tokens": tokens,
      "decoder_target_tokens": np.roll(tokens, -1, axis=-1),
      "decoder_loss_weights": np.ones(shape, np.int32),
      "decoder_language_ids": rng.integers(0, 16, shape, dtype=np.int32),
      "decoder_segment_ids": np.ones(shape, np.int32),
      "decoder_positions": (
          np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
      ),
  }


def time_train_step(model_config, batch_size, length, steps, warmup):
  """(median step seconds, compile seconds) of steps_lib.train_step."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  p = model_config.num_partitions
  shape = (p, batch_size // p, length)
  config = steps_lib.TrainConfig(train_steps=1000)
  s = train_state.setup(
      model_config,
      optimizers.OptimizerConfig(),
      config.train_steps,
      mesh,
      shape,
  )
  with sharding.with_sharding_rules(mesh):
    state = train_state.init_state(s, jax.random.key(0), shape)
    batch = sharding.to_global_batch(
        synthetic_batch(p, batch_size, length, model_config.vocab_size), mesh
    )
    rng = jax.random.key(1)
    step_fn = jax.jit(
        functools.partial(
            steps_lib.train_step,
            objective=steps_lib.LmObjective(s.model, config),
            tx=s.tx,
        ),
        out_shardings=(s.shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - start)
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"non-finite train step for {model_config}")
  return statistics.median(times), compile_s


def time_input_pipeline(n, batch_size, length, steps):
  """Median seconds per batch of the SeqIO pipeline incl. device transfer."""
  scheme = schemes.make_scheme("family", n)
  names = seqio_names.partition_mixture_names("sample", scheme)
  dataset = pipeline.partitioned_dataset(
      names,
      global_batch_size=batch_size,
      sequence_length=length,
      seed=0,
      pack=True,
  )
  mesh = sharding.make_mesh(sharding.MeshConfig())
  iterator = pipeline.batch_iterator(dataset)
  times = []
  for i in range(2 + steps):  # Two warm-up batches fill the pipeline.
    start = time.perf_counter()
    jax.block_until_ready(sharding.to_global_batch(next(iterator), mesh))
    if i >= 2:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def _measure(family, n, sharing, opts, input_cache):
  spec = FAMILIES[family]
  b = opts["batch_size"] or spec["batch_size"]
  length = opts["length"] or spec["length"]
  config = equal_total_config(spec["model"], n, sharing)
  count = _count(config)
  target = _total(
      scaled_config(spec["model"], 1, sharing, spec["model"].d_model)
  )
  off = count.total / target - 1
  step_s, compile_s = time_train_step(
      config, b, length, opts["steps"], _WARMUP.value
  )
  row = dict(
      family=family,
      sharing=sharing,
      partitions=n,
      d_model=config.d_model,
      experts_per_part=config.num_experts,
      expert_d_ff=config.expert_d_ff,
      total_params_M=count.total / 1e6,
      active_params_M=count.active / 1e6,
      batch=b,
      length=length,
      step_ms=1e3 * step_s,
      tokens_per_s=b * length / step_s,
      compile_s=compile_s,
      # Far off when even the smallest d_model (8) has too many embedding
      # parameters: n vocab x d_model tables.
      total_vs_n1=f"{off:+.0%}",
  )
  if _INPUT.value:
    key = (n, b, length)
    if key not in input_cache:
      input_cache[key] = time_input_pipeline(n, b, length, opts["steps"])
    row.update(
        input_ms=1e3 * input_cache[key],
        input_over_step=input_cache[key] / step_s,
    )
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # SeqIO warns about every task.
  opts = {k: _setting(k) for k in SETTINGS}
  bad = [f for f in opts["families"] if f not in FAMILIES] + [
      s for s in opts["sharing"] if s not in SHARING
  ]
  if bad:
    raise app.UsageError(
        f"Unknown families/sharing {bad}; allowed: "
        f"{list(FAMILIES)} / {SHARING}."
    )
  header = (
      f"bench_train: {benchmark_timing.machine_description()}\n"
      f"steps.train_step (AdamW, LM objective), synthetic batches on device; "
      f"median of {opts['steps']} steps\ncommand: {' '.join(sys.argv)}"
  )
  print(header)
  print(benchmark_timing.text_table([], COLUMNS), flush=True)
  rows, input_cache = [], {}
  for family in opts["families"]:
    for n in [int(v) for v in opts["partitions"]]:
      # With one partition every sharing level is the same model: time it
      # once and label the row 'any'.
      levels = opts["sharing"][:1] if n == 1 else opts["sharing"]
      for sharing in levels:
        row = _measure(family, n, sharing, opts, input_cache)
        if n == 1 and len(opts["sharing"]) > 1:
          row["sharing"] = "any"
        rows.append(row)
        print(
            benchmark_timing.text_table(rows[-1:], COLUMNS).splitlines()[-1],
            flush=True,
        )
  print("\n" + benchmark_timing.text_table(rows, COLUMNS))
  for path in benchmark_timing.write_outputs(
      _OUTPUT_DIR.value,
      "bench_train",
      rows,
      COLUMNS,
      header.replace("\n", "  \n"),
  ):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
