"""Routing analysis of a trained checkpoint: restore, run validation, report.

`analyze_checkpoint` is the library entry point of the analyze_routing
binary: it restores the params of MODEL_DIR onto the current devices
(`train.restore`), runs every language's validation rows through its own
tier-1 partition with the per-language evaluator (`eval.language_eval`, the
per-language loss, bits per byte and per-token routing an unlearning sweep
also uses, so the numbers agree), and writes the report of
`routing_report.write_report`.
"""

from typing import Any, Mapping, Optional

import jax

from tiered_routing import sharding
from tiered_routing.analysis import routing_report
from tiered_routing.data import eval_data
from tiered_routing.data import feature_rows
from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import schemes
from tiered_routing.train import restore


def collect(
    config: decoder_config.DecoderConfig,
    scheme: schemes.PartitionScheme,
    params: Any,
    validation: Mapping[str, feature_rows.Rows],
    vocabulary,
    mesh: jax.sharding.Mesh,
    rows_per_batch: int = 8,
) -> language_eval.EvalResult:
  """Per-language loss and routing counts of `params` on `validation`.

  Args:
    config: the model.
    scheme: its tier-1 scheme (which partition scores which language).
    params: the model's params (e.g. `restore.restore_params`).
    validation: {code: {feature: int32 [n, L]}} for all 16 languages, one
      sequence per row (`stream_cache.DataCache.validation_rows`).
    vocabulary: SeqIO vocabulary of the targets (bytes for bits per byte).
    mesh: where `params` live; batches are split over its data axis.
    rows_per_batch: rows per partition of one evaluation batch.
  """
  evaluator = language_eval.LanguageEvaluator(
      config,
      eval_data.language_blocks(validation, scheme, rows_per_batch),
      vocabulary,
      to_device=lambda batch: sharding.to_global_batch(batch, mesh),
  )
  with sharding.with_sharding_rules(mesh):
    return evaluator.evaluate(params, capture_routing=True)


def analyze_checkpoint(
    model_dir: str,
    config: decoder_config.DecoderConfig,
    scheme: schemes.PartitionScheme,
    validation: Mapping[str, feature_rows.Rows],
    vocabulary,
    output_dir: str,
    *,
    top_m: int = 1,
    step: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    rows_per_batch: int = 8,
    weighted: bool = False,
    make_plots: bool = True,
) -> tuple[routing_report.RoutingReport, dict[str, str]]:
  """Restores MODEL_DIR, collects routing per language, writes the report.

  Args:
    model_dir: the training run's directory.
    config: its model config.
    scheme: its tier-1 partition scheme.
    validation, vocabulary, rows_per_batch: see `collect`.
    output_dir: where `routing_report.write_report` writes.
    top_m: m of the top-m coverage.
    step: checkpoint step; None = the newest.
    mesh: target mesh; default all current devices on 'data'.
    weighted: statistics of gate mass instead of slot counts.
    make_plots: also write the PNG heatmaps.

  Returns:
    (the report, {kind: path written}).
  """
  routing_report.check_top_m(top_m, config)  # Before the slow part.
  mesh = mesh or sharding.make_mesh(sharding.MeshConfig())
  step, params = restore.restore_params(model_dir, config, mesh=mesh, step=step)
  result = collect(
      config, scheme, params, validation, vocabulary, mesh, rows_per_batch
  )
  metadata = {
      "model_dir": model_dir,
      "step": step,
      "scheme": scheme.name,
      "num_partitions": config.num_partitions,
      "router": config.router,
      "top_k": config.top_k,
      "weighted": weighted,
      "devices": jax.device_count(),
  }
  report = routing_report.build_report(
      result.routing,
      config,
      scheme,
      top_m,
      language_results=result.language_results(),
      weighted=weighted,
      metadata=metadata,
  )
  return report, routing_report.write_report(report, output_dir, make_plots)
