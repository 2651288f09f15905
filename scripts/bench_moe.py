r"""Times one MoE layer against a dense FFN with the same active FLOPs.

For every (experts E, top_k k, tokens T) the forward + backward pass of one
`MoeFeedForward` (router, dispatch, gated experts, combine, router losses) is
timed for each dispatch implementation and compared, in the same run, with

  * a dense gated FFN of hidden size k * expert_d_ff: the same matmul FLOPs
    per token as the k experts a token visits (ratio = MoE time / dense time);
  * a plain matmul [T, D] x [D, k * expert_d_ff]: its FLOP/s is the
    machine's attainable rate for matrices of this size, against which the
    "useful" FLOP/s of both layers (the dense FFN's FLOPs divided by the
    layer's time) are expressed ('mfu_vs_matmul').

The three are timed round-robin (matmul, dense, MoE, matmul, ...), so the
ratios hold even on a shared machine whose load drifts; the summary judges
scaling in T and E by these ratios, not by raw times.

Capacity dispatch ('einsum', 'sort_gather') computes capacity_factor times
the useful expert FLOPs (padded buffers); 'ragged' is dropless and exact.
Tokens are routed in groups of `--group_size` as in the model (0: one group).

  python scripts/bench_moe.py --preset=quick --output_dir=/tmp/bench_moe
  python scripts/bench_moe.py --experts=32 --top_k=2 --tokens=8192 \
      --impls=sort_gather,ragged
"""

import functools
import math
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from tiered_routing.cli import benchmark_timing
from tiered_routing.model import dispatch as dispatch_lib
from tiered_routing.model import layers
from tiered_routing.model import losses
from tiered_routing.model import moe

# pylint: enable=g-import-not-at-top,wrong-import-position

IMPLS = ("sort_gather", "einsum", "ragged")
SETTINGS = tuple(
    "experts top_k tokens d_model expert_d_ff repeats max_case_seconds".split()
)
_FULL_TOKENS = [1024, 2048, 4096, 8192, 16384, 32768]
PRESETS = {  # Values of SETTINGS.
    # The test's end-to-end run: seconds.
    "smoke": ([4, 8], [2], [128, 256], 32, 32, 2, 60.0),
    # About 9 minutes on 2 idle CPU cores (measured).
    "quick": ([8, 32, 128], [2], [1024, 2048, 4096, 8192], 256, 512, 3, 20.0),
    # The whole sweep (meant for accelerators; hours on a CPU).
    "full": ([8, 32, 128, 512], [1, 2, 4], _FULL_TOKENS, 256, 512, 5, 120.0),
}
COLUMNS = tuple(
    "impl experts top_k tokens ms dense_ms moe_over_dense gflops mfu_vs_matmul"
    " dense_mfu_vs_matmul matmul_gflops repeats compile_s note".split()
)

_PRESET = flags.DEFINE_enum("preset", "quick", list(PRESETS), "Sweep.")
_EXPERTS = flags.DEFINE_list("experts", None, "Numbers of experts E.")
_TOP_K = flags.DEFINE_list("top_k", None, "Experts per token k.")
_TOKENS = flags.DEFINE_list("tokens", None, "Tokens T per layer call.")
_IMPLS = flags.DEFINE_list("impls", list(IMPLS), "Dispatch impls to time.")
_D_MODEL = flags.DEFINE_integer("d_model", None, "Model width D.")
_EXPERT_D_FF = flags.DEFINE_integer("expert_d_ff", None, "Expert width F.")
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size", 4096, "Tokens per group; 0: T."
)
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed rounds (median).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed rounds first.")
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", 1.25, "Capacity impls."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Acts.")
flags.DEFINE_float(
    "max_case_seconds",
    None,
    "Per-case budget: fewer rounds when the warm-up shows they would not fit;"
    " skip a case whose extrapolated run time (from fewer tokens) exceeds it.",
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Writes CSV and .md.")

# Unset sweep flags (experts, top_k, tokens, d_model, expert_d_ff, repeats,
# max_case_seconds) take the preset's value.


def _setting(name: str):
  """The flag's value if given on the command line, else the preset's."""
  flag = flags.FLAGS[name]
  if flag.present:
    value = flag.value
  else:
    value = PRESETS[_PRESET.value][SETTINGS.index(name)]
  if name in ("experts", "top_k", "tokens"):
    value = [int(v) for v in value]
    if not value or min(value) < 1:
      raise ValueError(f"--{name}={value}: need positive integers.")
  return value


def _impls() -> list[str]:
  bad = [v for v in _IMPLS.value if v not in IMPLS]
  if bad or not _IMPLS.value:
    raise ValueError(
        f"--impls={_IMPLS.value}: unknown {bad}; allowed: " f"{IMPLS}."
    )
  return _IMPLS.value


def _groups(tokens: int, group_size: int) -> tuple[int, int]:
  return moe.group_shape(1, tokens, group_size or tokens)


def _layer_grad_fn(module, with_router_losses: bool):
  """jit(grad) of <module(x), dy> (+ router losses) w.r.t. params and x."""

  def loss(params, x, dy):
    y, state = module.apply({"params": params}, x, mutable=["intermediates"])
    value = jnp.vdot(y.astype(jnp.float32), dy)
    if with_router_losses:  # The ST-MoE coefficients, as in training.
      router = losses.collect_router_losses(state.get("intermediates", {}))
      value += (
          1e-2 * router["load_balance_loss"] + 1e-3 * router["router_z_loss"]
      )
    return value

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _inputs(tokens, group_size, d_model, dtype, seed=0):
  g, s = _groups(tokens, group_size)
  kx, kdy = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (g, s, d_model), jnp.float32).astype(dtype)
  dy = jax.random.normal(kdy, (g, s, d_model), jnp.float32)
  return x, dy


def _compiled_module(module, x, dy, *, is_moe):
  """(compiled fwd+bwd, its args, compile seconds) of a layer module."""
  # Eager init would dispatch (and compile) every initializer op by op.
  params = jax.jit(module.init)(jax.random.key(1), x)["params"]
  fn = _layer_grad_fn(module, is_moe)
  args = (params, x, dy)
  compiled, compile_s = benchmark_timing.compile_jitted(fn, args)
  return compiled, args, compile_s


def _compiled_matmul(tokens, d_model, width, dtype):
  x = jnp.ones((tokens, d_model), dtype)
  w = jnp.ones((d_model, width), dtype)
  fn = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
  compiled, _ = benchmark_timing.compile_jitted(fn, (x, w))
  return compiled, (x, w)


def _predicted_seconds(impl, history, tokens, group_size):
  """Extrapolates one run's time from the largest smaller case measured.

  Everything scales linearly with the number of groups; within a group
  'einsum' is quadratic (its [S, E, C] dispatch tensor), the others about
  linear.
  """
  if not history:
    return 0.0
  last_tokens, last_s = history[-1]
  (g0, s0), (g1, s1) = (
      _groups(last_tokens, group_size),
      _groups(tokens, group_size),
  )
  power = 2 if impl == "einsum" else 1
  return last_s * (g1 / g0) * (s1 / s0) ** power


def _baselines(k, tokens, cfg):
  """Compiled plain matmul and dense FFN for one (k, T), with their FLOPs."""
  width = k * cfg["expert_d_ff"]
  x, dy = _inputs(tokens, cfg["group_size"], cfg["d_model"], cfg["dtype"])
  dense, dense_args, _ = _compiled_module(
      layers.Mlp(d_ff=width, gated=True, dtype=cfg["dtype"]),
      x,
      dy,
      is_moe=False,
  )
  matmul = _compiled_matmul(tokens, cfg["d_model"], width, cfg["dtype"])
  flops = 2.0 * tokens * cfg["d_model"] * width
  # Useful FLOPs of fwd + bwd of a gated FFN: 3 matmuls, each 3 times.
  return dict(
      calls=[matmul, (dense, dense_args)],
      matmul_flops=flops,
      useful_flops=9 * flops,
      x=x,
      dy=dy,
  )


def _row(impl, e, k, tokens, timings, base, compile_s, note=""):
  """A table row; `timings` are (matmul, dense, moe) or None if skipped."""
  row = dict(impl=impl, experts=e, top_k=k, tokens=tokens, note=note)
  if timings is None:
    return row
  matmul_s, dense_s, moe_s = (t.median_s for t in timings)
  peak = base["matmul_flops"] / matmul_s
  useful = base["useful_flops"]
  row.update(
      ms=1e3 * moe_s,
      dense_ms=1e3 * dense_s,
      moe_over_dense=moe_s / dense_s,
      gflops=useful / moe_s / 1e9,
      mfu_vs_matmul=useful / moe_s / peak,
      dense_mfu_vs_matmul=useful / dense_s / peak,
      matmul_gflops=peak / 1e9,
      repeats=timings[-1].repeats,
      compile_s=compile_s,
  )
  return row


def _moe_cases(e, k, tokens, base, cfg, history):
  """Rows of every impl for one (E, k, T); updates `history`.

  Each MoE layer is timed round-robin with the matmul and the dense FFN,
  so its ratios compare runs made under the same machine load.
  """
  rows = []
  for impl in cfg["impls"]:
    if k > e:
      continue
    past = history.setdefault((impl, e, k), [])
    guess = _predicted_seconds(impl, past, tokens, cfg["group_size"])
    if guess > cfg["budget_s"]:
      rows.append(
          _row(
              impl,
              e,
              k,
              tokens,
              None,
              base,
              0.0,
              f"skipped: ~{guess:.0f} s/run predicted",
          )
      )
      continue
    module = moe.MoeFeedForward(
        num_experts=e,
        expert_d_ff=cfg["expert_d_ff"],
        top_k=k,
        dispatch=impl,
        capacity_factor=cfg["capacity_factor"],
        gated=True,
        dtype=cfg["dtype"],
    )
    compiled, args, compile_s = _compiled_module(
        module, base["x"], base["dy"], is_moe=True
    )
    timings = benchmark_timing.time_interleaved(
        base["calls"] + [(compiled, args)],
        warmup=_WARMUP.value,
        repeats=cfg["repeats"],
        budget_s=cfg["budget_s"],
    )
    past.append((tokens, timings[-1].median_s))
    rows.append(_row(impl, e, k, tokens, timings, base, compile_s))
    last = benchmark_timing.text_table(rows[-1:], COLUMNS).splitlines()[-1]
    print(last, flush=True)
  return rows


def run_sweep(cfg) -> list[dict]:
  """All rows: for each (k, T) and E, every impl."""
  rows, history = [], {}
  print(benchmark_timing.text_table([], COLUMNS), flush=True)
  for k in cfg["top_k"]:
    for tokens in sorted(cfg["tokens"]):
      base = _baselines(k, tokens, cfg)
      for e in cfg["experts"]:
        rows += _moe_cases(e, k, tokens, base, cfg, history)
  rows.sort(key=lambda r: (r["top_k"], r["tokens"], r["experts"]))
  return rows


def _measured(rows):
  return [r for r in rows if r.get("ms") is not None]


# The summary compares cases through `moe_over_dense`: on a shared machine
# the load drifts between cases, but each MoE run is paired with dense runs
# interleaved with it. The dense FFN's time is ~linear in T and independent
# of E, so the ratio's trend in T gives the MoE's own exponent and its trend
# in E the cost of more experts at fixed active FLOPs.
def summarize(rows, backend) -> list[str]:
  """Lines about the targets: best impl, scaling in T and in E."""
  best = {}
  for r in _measured(rows):
    key = (r["experts"], r["top_k"], r["tokens"])
    if key not in best or r["moe_over_dense"] < best[key]["moe_over_dense"]:
      best[key] = r
  wins = {}
  for r in best.values():
    wins[r["impl"]] = wins.get(r["impl"], 0) + 1
  auto = dispatch_lib.resolve_impl("auto")
  lines = [
      f"fastest impl per (E, k, T) on {backend}: {wins}; dispatch='auto' "
      f"resolves to {auto!r}."
  ]
  for (e, k, t), r in sorted(best.items()):
    lines.append(
        f"best at E={e} k={k} T={t}: {r['impl']} "
        f"{r['moe_over_dense']:.2f}x dense"
    )
  by_impl = {}
  for r in _measured(rows):
    by_impl.setdefault((r["impl"], r["experts"], r["top_k"]), []).append(r)
  return lines + _token_scaling(by_impl) + _expert_scaling(by_impl)


def _token_scaling(by_impl) -> list[str]:
  """Exponent p of time ~ T^p between successive T (dense-normalized)."""
  lines = []
  for (impl, e, k), rs in sorted(by_impl.items()):
    rs = sorted(rs, key=lambda r: r["tokens"])
    if len(rs) < 2:
      continue
    exps = [
        1
        + math.log(b["moe_over_dense"] / a["moe_over_dense"])
        / math.log(b["tokens"] / a["tokens"])
        for a, b in zip(rs, rs[1:])
    ]
    lines.append(
        f"time ~ T^p, {impl} E={e} k={k}: p = "
        + ", ".join(f"{p:.2f}" for p in exps)
        + f" (T={rs[0]['tokens']}..{rs[-1]['tokens']})"
    )
  return lines


def _expert_scaling(by_impl) -> list[str]:
  """MoE/dense at each E relative to the smallest E (same impl, k, T)."""
  lines = []
  for impl, k in sorted({(impl, k) for impl, _, k in by_impl}):
    es = sorted(e for i, e, kk in by_impl if i == impl and kk == k)
    ref = {r["tokens"]: r["moe_over_dense"] for r in by_impl[(impl, es[0], k)]}
    for e in es[1:]:
      ratios = [
          f"T={r['tokens']}: {r['moe_over_dense'] / ref[r['tokens']]:.2f}"
          for r in by_impl[(impl, e, k)]
          if r["tokens"] in ref
      ]
      if ratios:
        lines.append(
            f"{impl} k={k}: time(E={e}) / time(E={es[0]}) " + ", ".join(ratios)
        )
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cfg = {name: _setting(name) for name in SETTINGS}
  cfg.update(
      impls=_impls(),
      group_size=_GROUP_SIZE.value,
      dtype=jnp.dtype(_DTYPE.value),
      budget_s=cfg["max_case_seconds"],
      capacity_factor=_CAPACITY_FACTOR.value,
  )
  header = (
      f"bench_moe: {benchmark_timing.machine_description()}\n"
      f"D={cfg['d_model']} F={cfg['expert_d_ff']} (gated) "
      f"group_size={cfg['group_size']} capacity_factor="
      f"{cfg['capacity_factor']} dtype={_DTYPE.value} "
      f"repeats={cfg['repeats']} (median)\n"
      f"command: {' '.join(sys.argv)}"
  )
  print(header)
  rows = run_sweep(cfg)
  print("\n" + benchmark_timing.text_table(rows, COLUMNS))
  summary = summarize(rows, jax.default_backend())
  print("\n" + "\n".join(summary))
  for path in benchmark_timing.write_outputs(
      _OUTPUT_DIR.value,
      "bench_moe",
      rows,
      COLUMNS,
      header=header.replace("\n", "  \n") + "\n\n" + "  \n".join(summary),
  ):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
