r"""Per-language validation loss, perplexity and bits per byte of a checkpoint.

  python -m tiered_routing.eval --gin_file=gin/quickstart.gin \
      --gin_file=gin/runs/eval.gin --gin.MODEL_DIR="'/tmp/tr_quickstart'"

(`python -m tiered_routing.cli.eval` is the same binary.) Give the gin
files of the training run first (model, data, BATCH_SIZE,
TASK_FEATURE_LENGTHS), then gin/runs/eval.gin. Every language of every
partition's mixture is evaluated on its whole SeqIO `split` (no sampling)
by the per-language evaluator (`eval.language_eval`): partition p's tasks
fill row block p of the [P, B/P, L] batches, so each language goes through
its own partition's parameters.

Two further paths (gin/runs/eval_routing.gin), each on unpacked rows:
  * `routing`: tier-1 inference routing (`eval.routed_eval`): every
    mode's per-language loss and bits per byte ('routing/{mode}/...'), its
    routing accuracy against the oracle and its utility cost (mode - oracle),
    also printed as a table. The classifier is fit on the tasks' train split.
  * `seqio_evaluator`: SeqIO's own evaluation (`eval.seqio_eval`): a
    `seqio.Evaluator` per partition mixture, scored by the tasks' score
    metric fns from the model's per-example log-likelihoods ('seqio/...').

Writes MODEL_DIR/eval/<name>/<split>_step_<N>.json, TensorBoard scalars and
metrics.jsonl, and the evaluation's gin config (config.gin) in the same
directory. <name> is EVAL_NAME, or by default '<split>-<digest of the gin
config>', so two different evaluation setups (another routing mode, another
capacity factor) never replace each other's results or share a TensorBoard
curve. The directory is checked for writing before any work is done.
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional

from absl import flags
from absl import logging
import gin
import jax
import tensorflow as tf

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.cli import user_errors
from tiered_routing.data import eval_data
from tiered_routing.eval import language_eval
from tiered_routing.eval import lm_metrics
from tiered_routing.eval import routed_eval
from tiered_routing.eval import scoring
from tiered_routing.eval import seqio_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import language_classifier
from tiered_routing.tier1 import schemes
from tiered_routing.train import atomic_file
from tiered_routing.train import metrics_writer
from tiered_routing.train import restore

FLAGS = flags.FLAGS
REQUIRED_MACROS = (
    "MODEL_DIR",
    "MIXTURE_OR_TASK_NAME",
    "BATCH_SIZE",
    "TASK_FEATURE_LENGTHS",
)


def _config_text() -> str:
  """The gin config without MODEL_DIR and CHECKPOINT_STEP (where and
  which step, not how)."""
  return "\n".join(
      line for line in gin.config_str().splitlines()
      if not re.match(r"\s*(MODEL_DIR|CHECKPOINT_STEP)\s*=", line)
  )


def eval_dir(model_dir: str, split: str, eval_name: Optional[str]) -> str:
  """MODEL_DIR/eval/<name>, created, checked writable, with config.gin.

  Raises:
    ValueError: on a bad name, or a name holding another configuration's
      results.
    OSError: if the directory cannot be written (before any work).
  """
  config = _config_text()
  if eval_name is None:
    eval_name = f"{split}-{hashlib.sha256(config.encode()).hexdigest()[:8]}"
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", eval_name):
    raise ValueError(
        f"EVAL_NAME={eval_name!r}: allowed are letters, digits, '.', '_' "
        "and '-' (a directory name under MODEL_DIR/eval).")
  out_dir = os.path.join(model_dir, "eval", eval_name)
  if jax.process_index() != 0:
    return out_dir
  try:
    tf.io.gfile.makedirs(out_dir)
    probe = os.path.join(out_dir, f".writable-{os.getpid()}")
    atomic_file.write_text(probe, "")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise PermissionError(
        f"Cannot write the evaluation results to {out_dir}: "
        f"{getattr(e, 'message', None) or e}") from None
  path = os.path.join(out_dir, "config.gin")
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      if f.read() != config:
        raise ValueError(
            f"EVAL_NAME={eval_name!r} already holds the results of another "
            f"evaluation configuration ({path}); choose another EVAL_NAME.")
  else:
    atomic_file.write_text(path, config)
  return out_dir


def _write_results(
    out_dir: str,
    split: str,
    step: int,
    results: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
) -> str:
  writer = metrics_writer.MetricsWriter(out_dir)
  writer.write(step, {f"{split}/{k}": v for k, v in results.items()})
  writer.close()
  path = os.path.join(out_dir, f"{split}_step_{step}.json")
  if jax.process_index() == 0:
    record = {"step": step, "split": split, **results, **(extra or {})}
    atomic_file.write_text(path, json.dumps(record, indent=1, sort_keys=True))
  return path


def evaluate_unpacked(
    model, params, mesh, data, routing, seqio_evaluator, step=None
) -> dict[str, float]:
  """The routed and / or SeqIO paths (see the module doc).

  Args:
    data: (mixture or task names, scheme, length, rows, split, vocabulary).
  """
  names, scheme, length, rows, split, vocabulary = data
  scorer = scoring.PartitionScorer(model, params, mesh, rows)
  out = {}  # Empty unless `routing` or `seqio_evaluator`.
  if routing is not None:
    clf = None
    if routing.needs_classifier:
      texts = eval_data.train_texts(names, routing.classifier_docs)
      clf = language_classifier.LanguageClassifier().fit(texts)
    routed = routed_eval.RoutedScorer(scorer, scheme, vocabulary, routing, clf)
    batches = eval_data.split_batches(names, length, rows, split)
    out.update(routed_eval.evaluate(routed, batches))
    print(routed_eval.format_table(out, routing.labels), flush=True)
  if seqio_evaluator:
    oracle = routed_eval.RoutedScorer(
        scorer, scheme, vocabulary, routed_eval.RoutingConfig("oracle")
    )
    score_fn = seqio_eval.make_score_fn(oracle)
    out.update(seqio_eval.evaluate(names, length, score_fn, split, step))
  return out


def _packed_results(config, params, mesh, data, pack) -> dict[str, float]:
  """Every language's whole split, packed like training rows, through its
  own partition (the per-language evaluator, streaming)."""
  names, _, length, rows, split, _ = data
  evaluator = language_eval.split_evaluator(
      config,
      names,
      length,
      rows,
      split=split,
      pack=pack,
      materialize=False,
      to_device=lambda b: sharding.to_global_batch(b, mesh),
      partitions_alone=False,
  )
  return evaluator.evaluate(params).flat()


def _check_sizes(scheme, num_partitions: int, batch_size: int) -> None:
  p = num_partitions
  if scheme.num_partitions != p or batch_size % p:
    raise ValueError(
        f"Need scheme.num_partitions == num_partitions == {p} "
        f"and BATCH_SIZE={batch_size} a multiple of {p}."
    )


@gin.configurable("evaluate", module="eval_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: Any = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    mesh_config: Optional[sharding.MeshConfig] = None,
    checkpoint_step: Optional[int] = None,
    split: str = "validation",
    pack: bool = True,
    routing: Optional[routed_eval.RoutingConfig] = None,
    seqio_evaluator: bool = False,
    eval_name: Optional[str] = None,
) -> dict[str, float]:
  """Evaluates a checkpoint of model_dir (default: the newest).

  `routing` (modes) and `seqio_evaluator` add the module doc's other paths;
  results go to MODEL_DIR/eval/<eval_name> (`eval_dir`).

  Returns:
    Flat metrics '{code}/loss', '{code}/perplexity', '{code}/bits_per_byte',
    '{code}/num_tokens', '{code}/num_bytes', the pooled 'all/...' and the
    unweighted language mean 'macro/...'; with `routing`, the same under
    'routing/{mode}/' plus routing accuracy and '..._cost' (mode - oracle);
    with `seqio_evaluator`, 'seqio/{code}/...'.
  """
  p = model_config.num_partitions
  _check_sizes(scheme, p, batch_size)
  names = gin_flags.mixture_names(mixture_or_task_name, p)
  length = gin_flags.task_feature_length(task_feature_lengths)
  out_dir = eval_dir(model_dir, split, eval_name)
  mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
  model = transformer.TieredDecoder(model_config)
  with sharding.with_sharding_rules(mesh):
    # Read-only: evaluating a run that is still training must not clean up
    # the checkpoint it is writing.
    step, params = restore.restore_params(
        model_dir, model_config, mesh=mesh, step=checkpoint_step
    )
    vocabulary = eval_data.vocabulary_of(names[0])
    data = (names, scheme, length, batch_size // p, split, vocabulary)
    results = _packed_results(model_config, params, mesh, data, pack)
    print(f"Step {step}, {split} split:\n"
          f"{lm_metrics.format_language_table(results)}", flush=True)
    results.update(
        evaluate_unpacked(
            model, params, mesh, data, routing, seqio_evaluator, step
        )
    )
  extra = routing and {"routing_config": dataclasses.asdict(routing)}
  path = _write_results(out_dir, split, step, results, extra)
  bpb = results["all/bits_per_byte"]
  logging.info(
      "Step %d %s: all/bits_per_byte %.4f -> %s", step, split, bpb, path
  )
  return results


def main(argv):
  gin_flags.maybe_initialize_distributed()
  gin_flags.parse_command_line(argv, REQUIRED_MACROS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
