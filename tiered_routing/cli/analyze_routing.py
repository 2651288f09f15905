r"""Routing statistics of a trained checkpoint, per MoE layer and language.

  python -m tiered_routing.cli.analyze_routing --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'" \
      --output_dir=/tmp/tr_quickstart/routing

Give the training run's gin files (model, DATA_SOURCE, SCHEME,
TASK_FEATURE_LENGTHS) and MODEL_DIR. The newest checkpoint's params (or
--checkpoint_step's) are restored onto the devices of this machine, every
language's whole validation split of DATA_SOURCE goes through its own tier-1
partition, and `analysis.routing_report` writes routing_stats.csv,
routing_stats.json, routing_usage.png and routing_js_layer<m>.png into
--output_dir (default MODEL_DIR/routing). A Markdown summary goes to stdout.
The training run's gin files register the SeqIO tasks (gin/runs/tasks.gin);
`scripts/analyze_routing.py` runs this binary too.

The params land on a mesh of all local devices on 'data' (replicated
params, batches split); another layout can be bound with
--gin_bindings="analyze_routing_script.analyze.mesh_config =
@tiered_routing.MeshConfig()" plus that MeshConfig's axis sizes.
"""

import os
from typing import Any, Mapping, Optional

from absl import flags
from absl import logging
import gin
import numpy as np

from tiered_routing import sharding
from tiered_routing.analysis import checkpoint_analysis
from tiered_routing.analysis import routing_report
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
# The training run's gin files bind train_script.train: register it.
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.cli import user_errors
from tiered_routing.data import eval_data
from tiered_routing.data import seqio_names
from tiered_routing.data import stream_cache
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

_TOP_M = flags.DEFINE_integer("top_m", 1, "m of the top-m coverage.")
_ROWS = flags.DEFINE_integer(
    "rows_per_batch", 8, "Validation rows per partition per batch."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_validation_examples",
    None,
    "Validation examples per language (default: the whole split).",
)
_WEIGHTED = flags.DEFINE_bool(
    "weighted", False, "Statistics of gate mass instead of routed slots."
)
_PLOTS = flags.DEFINE_bool("plots", True, "Write the PNG heatmaps.")

FLAGS = flags.FLAGS
REQUIRED_MACROS = (
    "MODEL_DIR",
    "DATA_SOURCE",
    "SCHEME",
    "TASK_FEATURE_LENGTHS",
)
# Bound before --gin_bindings, which can override them.
BINDINGS = (
    "analyze_routing_script.analyze.model_dir = %MODEL_DIR",
    "analyze_routing_script.analyze.data_source = %DATA_SOURCE",
    "analyze_routing_script.analyze.task_feature_lengths = "
    "%TASK_FEATURE_LENGTHS",
    "analyze_routing_script.analyze.scheme = %SCHEME",
    "analyze_routing_script.analyze.model_config = "
    "@tiered_routing.DecoderConfig()",
)


def validation_data(data_source: str, length: int, max_examples):
  """({code: validation rows}, the targets' vocabulary) of every language."""
  names = {c: seqio_names.task_name(data_source, c) for c in languages.CODES}
  cache = stream_cache.DataCache(length, max_validation_examples=max_examples)
  rows = cache.validation_rows(names)
  return rows, eval_data.vocabulary_of(names[languages.CODES[0]])


def _fmt(x: Optional[float]) -> str:
  return "" if x is None else f"{x:.3f}"


def markdown_summary(report: routing_report.RoutingReport) -> str:
  """Per-layer MI and one table row per (layer, language)."""
  lines = []
  for s in report.layers:
    within = ", ".join(f"{x:.2f}" for x in s.mi_within_partition_bits_P)
    lines.append(
        f"MoE layer {s.layer} (block {s.model_layer}): I(L; E) = "
        f"{s.mi_bits:.3f} bits, normalized {s.nmi:.3f}; within each "
        f"partition: [{within}] bits"
    )
  lines += [
      "",
      "| layer | language | partition | loss | top expert | top-1 share |"
      f" top-{report.top_m} coverage | normalized entropy |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in routing_report.csv_rows(report):
    lines.append(
        f"| {r['layer']} | {r['language']} | {r['partition']} | "
        f"{_fmt(r['loss'])} | {r['top_expert']} | "
        f"{_fmt(r['top_expert_share'])} | {_fmt(r['top_m_coverage'])} | "
        f"{_fmt(r['normalized_entropy'])} |"
    )
  return "\n".join(lines)


@gin.configurable("analyze", module="analyze_routing_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    data_source: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    mesh_config: Optional[sharding.MeshConfig] = None,
) -> tuple[routing_report.RoutingReport, dict[str, Any]]:
  """Analyzes MODEL_DIR's checkpoint; returns the report and its paths."""
  length = gin_flags.task_feature_length(task_feature_lengths)
  validation, vocabulary = validation_data(
      data_source, length, _MAX_EXAMPLES.value
  )
  output_dir = gin_flags.OUTPUT_DIR.value or os.path.join(model_dir, "routing")
  report, paths = checkpoint_analysis.analyze_checkpoint(
      model_dir,
      model_config,
      scheme,
      validation,
      vocabulary,
      output_dir,
      top_m=_TOP_M.value,
      step=gin_flags.CHECKPOINT_STEP.value,
      mesh=sharding.make_mesh(mesh_config or sharding.MeshConfig()),
      rows_per_batch=_ROWS.value,
      weighted=_WEIGHTED.value,
      make_plots=_PLOTS.value,
  )
  tokens = int(np.sum(report.counts.tokens_NxM[:, 0]))
  print(
      f"{model_dir} step {report.metadata['step']}: {tokens} validation "
      f"tokens, scheme {scheme.name}, sharing {model_config.sharing}\n"
  )
  print(markdown_summary(report))
  for kind, path in sorted(paths.items()):
    logging.info("Wrote %s: %s", kind, path)
  return report, paths


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS, BINDINGS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
