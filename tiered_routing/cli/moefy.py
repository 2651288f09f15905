r"""MoEfies a dense checkpoint and reports validation loss at several k.

  python -m tiered_routing.cli.moefy \
      --gin_file=gin/experiments/moefication.gin \
      --gin_file=gin/experiments/moefy.gin \
      --gin.MODEL_DIR="'/tmp/rm_moefication'"

Give the dense training run's gin files first, then gin/experiments/moefy.gin.
Every dense FFN of the newest checkpoint is clustered into N experts
(`related.moefied_decoder`); each token then computes only its top-k
experts, chosen by the oracle partition activation ('positive': sum of
positive hidden activations, the paper's criterion; 'abs': sum of |h|) or by
a linear router fitted to the 'positive' scores on training batches;
'unclustered' splits the hidden units in their trained order instead of by
k-means (the paper's ablation of the clustering). The whole validation split
of every language is evaluated; the table (Markdown) goes to stdout and to
OUTPUT (default MODEL_DIR/moefication.md). `scripts/moefy.py` runs this
binary too.
"""

import functools
import os
import time
from typing import Any, Mapping, Optional, Sequence

from absl import flags
from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.cli import user_errors
from tiered_routing.data import pipeline
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.related import method_tables
from tiered_routing.related import moefication
from tiered_routing.related import moefied_decoder
from tiered_routing.tier1 import schemes
from tiered_routing.train import restore

FLAGS = flags.FLAGS
REQUIRED_MACROS = (
    "MODEL_DIR",
    "MIXTURE_OR_TASK_NAME",
    "BATCH_SIZE",
    "TASK_FEATURE_LENGTHS",
)
COLUMNS = (
    "k",
    "active_ffn",
    "unclustered_positive",
    "oracle_positive",
    "oracle_abs",
    "learned_router",
    "dense",
)


def _router_inputs(model, params, names, batch_size, length, num_batches):
  """FFN inputs on `num_batches` training batches (for the routers)."""
  dataset = pipeline.partitioned_dataset(
      names,
      global_batch_size=batch_size,
      sequence_length=length,
      seed=1234,
  )
  iterator = pipeline.batch_iterator(dataset)
  batches = [next(iterator) for _ in range(num_batches)]
  return moefied_decoder.collect_mlp_inputs(model, params, batches)


def _rows(
    evaluator, dense_params, params, routed, num_experts, top_ks, dense
):
  """One table row per k: loss of every routing variant."""
  rows = []
  for k in top_ks:
    row = {"k": k, "active_ffn": f"{k}/{num_experts}", "dense": dense}
    for column, routing, score, p in (
        ("unclustered_positive", "oracle", "positive", dense_params),
        ("oracle_positive", "oracle", "positive", params),
        ("oracle_abs", "oracle", "abs", params),
        ("learned_router", "learned", "positive", routed),
    ):
      context = functools.partial(
          moefied_decoder.moefied,
          num_experts,
          k,
          routing=routing,
          score=score,
      )
      result = evaluator.evaluate(p, trace_context=context)
      row[column] = result.flat()["macro/loss"]
      logging.info("k=%d %s: %.4f", k, column, row[column])
    rows.append(row)
  return rows


def _active_fraction(params, ffn_inputs, model_config) -> float:
  """Mean share of hidden units with a positive activation per token."""
  shares = []
  for path, x_xTxD in ffn_inputs.items():
    mlp = params
    for name in path:
      mlp = mlp[name]
    lead = np.shape(x_xTxD)[:-2]
    for i in np.ndindex(*lead):
      experts = moefication.split_experts(
          {k: np.asarray(v)[i] for k, v in mlp.items()}, 1
      )
      h = moefication.expert_hidden(
          jnp.asarray(x_xTxD[i]), experts, model_config.activation
      )
      shares.append(float(jnp.mean(h > 0)))
  return float(np.mean(shares))


def _header(model_dir, step, config, num_experts, permuted, active) -> str:
  return (
      f"MoEfication of {model_dir} (step {step}), N={num_experts} "
      f"experts of {config.d_ff // num_experts} units per dense "
      f"FFN; activation={config.activation}, gated="
      f"{config.gated_mlp}. Validation loss (nats/token, mean over "
      f"languages); permuted dense model: {permuted:.4f}. Hidden units "
      f"with h > 0 per token: {active:.1%} (mean over FFNs).\n\n"
  )


@gin.configurable("run", module="moefy_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: Any = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    num_experts: int = 8,
    top_ks: Sequence[int] = (8, 4, 2, 1),
    router_batches: int = 8,
    kmeans_iterations: int = 30,
    seed: int = 0,
    output: Optional[str] = None,
) -> list[dict]:
  """Converts MODEL_DIR's newest checkpoint and evaluates it (see top)."""
  if model_config.num_experts:
    raise ValueError(
        f"MoEfication needs a dense model; num_experts="
        f"{model_config.num_experts}."
    )
  mesh = sharding.make_mesh(sharding.MeshConfig())
  p = model_config.num_partitions
  gin_flags.check_scheme(scheme, p)
  names = gin_flags.mixture_names(mixture_or_task_name, p)
  length = gin_flags.task_feature_length(task_feature_lengths)
  model = transformer.TieredDecoder(model_config)
  with sharding.with_sharding_rules(mesh):
    step, params = restore.restore_params(model_dir, model_config, mesh=mesh)
    params = jax.device_get(params)
    evaluator = language_eval.split_evaluator(
        model_config, names, length, batch_size // p, partitions_alone=False
    )
    dense = evaluator.evaluate(params).flat()["macro/loss"]
    start = time.time()
    config = moefication.MoeficationConfig(num_experts, kmeans_iterations, seed)
    moefied = moefied_decoder.moefy_params(params, config)
    logging.info("Clustered in %.1f s.", time.time() - start)
    permuted = evaluator.evaluate(moefied).flat()["macro/loss"]
    ffn_inputs = _router_inputs(
        model, moefied, names, batch_size, length, router_batches
    )
    routed = moefied_decoder.fit_routers(
        moefied,
        ffn_inputs,
        num_experts,
        activation=model_config.activation,
        score="positive",
    )
    active = _active_fraction(moefied, ffn_inputs, model_config)
    rows = _rows(
        evaluator, params, moefied, routed, num_experts, top_ks, dense
    )
  method_tables.write_table(
      output or os.path.join(model_dir, "moefication.md"),
      _header(model_dir, step, model_config, num_experts, permuted, active),
      rows,
      COLUMNS,
  )
  return rows


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
