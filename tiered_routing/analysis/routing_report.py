"""Per-layer, per-language routing report: CSV, JSON and PNG heatmaps.

`build_report` turns `RoutingCounts` (language x MoE layer x global expert)
into the statistics of `routing_stats` for every MoE layer; `write_report`
writes them into one directory:

  routing_stats.csv          one row per (MoE layer, language): tokens,
                             loss, bits per byte, entropy, top-m coverage,
                             top expert and its share.
  routing_stats.json         the same plus, per layer, the usage matrix,
                             mutual information (all languages and within
                             each partition) and the Jensen-Shannon matrix.
  routing_usage.png          p(expert | language), one panel per layer.
  routing_js_layer<m>.png    JS divergence between languages, layer m.

Expert ids are global (`unlearning.language_eval`): partition q's expert e
is q * E + e under sharing 'none' / 'attention'; under 'all' the P * E
experts are one pool. Tier 1 alone therefore puts log2(P) bits into
I(language; expert) with a uniform language prior; the within-partition MI
(languages of one partition on its own experts) is what tier 2 adds.
Normalized entropy divides by log2 of the experts a language can reach
(E, or P * E under 'all'), so 0 = always one expert, 1 = all reachable
experts equally (cf. the expert-specialization analyses of ST-MoE, Zoph et
al. 2022, Sec. 7).
"""

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from tiered_routing.analysis import plots
from tiered_routing.analysis import routing_stats
from tiered_routing.eval import routing_counts
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import atomic_file

CSV_NAME = "routing_stats.csv"
JSON_NAME = "routing_stats.json"
USAGE_PNG = "routing_usage.png"
CSV_COLUMNS = (
    "layer",
    "model_layer",
    "language",
    "partition",
    "tokens",
    "loss",
    "bits_per_byte",
    "entropy_bits",
    "normalized_entropy",
    "top_m",
    "top_m_coverage",
    "top_expert",
    "top_expert_share",
)


def js_png_name(layer: int) -> str:
  return f"routing_js_layer{layer}.png"


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Routing statistics of one MoE layer over N languages and E' experts.

  Attributes:
    layer: MoE layer index m (entry m of expert masks).
    model_layer: the decoder block it belongs to.
    usage_NxE: routed slots per language and global expert.
    entropy_bits_N: H(e | l) in bits; NaN for unrouted languages.
    normalized_entropy_N: H(e | l) / log2(experts reachable by l).
    top_m_coverage_N: share of routing in the language's m top experts.
    top_expert_N: the most used expert (-1 if unrouted).
    top_expert_share_N: its share (top-1 coverage).
    mi_bits: I(L; E), uniform prior over the routed languages.
    nmi: that MI normalized by min(H(L), H(E)).
    mi_within_partition_bits_P: I(L; E) of each partition's languages on
      its own experts (NaN if it has no routed language).
    js_NxN: Jensen-Shannon divergence of p(e | l) in bits.
  """

  layer: int
  model_layer: int
  usage_NxE: np.ndarray
  entropy_bits_N: np.ndarray
  normalized_entropy_N: np.ndarray
  top_m_coverage_N: np.ndarray
  top_expert_N: np.ndarray
  top_expert_share_N: np.ndarray
  mi_bits: float
  nmi: float
  mi_within_partition_bits_P: np.ndarray
  js_NxN: np.ndarray


@dataclasses.dataclass(frozen=True)
class RoutingReport:
  """Everything `write_report` writes.

  Attributes:
    codes: row order of every per-language array.
    partition_N: tier-1 partition of each language.
    experts_per_partition: E.
    sharing: the model's sharing level.
    top_m: m of the top-m coverage.
    counts: the raw counts.
    layers: one `LayerStats` per MoE layer.
    language_results: {code: {'loss', 'bpb', 'tokens', 'bytes'}} (may be
      empty).
    metadata: JSON-serializable run information (model dir, step, ...).
  """

  codes: tuple[str, ...]
  partition_N: np.ndarray
  experts_per_partition: int
  sharing: str
  top_m: int
  counts: routing_counts.RoutingCounts
  layers: tuple[LayerStats, ...]
  language_results: Mapping[str, Mapping[str, float]]
  metadata: Mapping[str, Any]


def check_top_m(top_m: int, config: decoder_config.DecoderConfig) -> None:
  """Raises ValueError unless 1 <= top_m <= E (experts per partition)."""
  if not isinstance(top_m, int) or not 1 <= top_m <= config.num_experts:
    raise ValueError(
        f"top_m={top_m!r}; allowed: 1..{config.num_experts} (experts per "
        "partition)."
    )


def reachable_experts(
    config: decoder_config.DecoderConfig, partition: int
) -> np.ndarray:
  """Global expert ids that tier 1 lets partition p's tokens use."""
  e = config.num_experts
  if config.sharing == "all":
    return np.arange(config.num_partitions * e)
  return np.arange(partition * e, (partition + 1) * e)


def _layer_stats(
    usage_NxE, m, model_layer, layer, partition_N, config
) -> LayerStats:
  routed_N = usage_NxE.sum(axis=1) > 0
  p_NxE = routing_stats.expert_distribution(usage_NxE)
  entropy = routing_stats.entropy_bits(usage_NxE)
  norm = np.full(len(usage_NxE), np.nan)
  within = np.full(config.num_partitions, np.nan)
  for q in range(config.num_partitions):
    rows, cols = partition_N == q, reachable_experts(config, q)
    sub = usage_NxE[rows][:, cols]
    norm[rows] = routing_stats.normalized_entropy(sub)
    if sub.sum() > 0:
      within[q] = routing_stats.mutual_information(sub, "uniform")
  top = np.argmax(p_NxE, axis=1)
  return LayerStats(
      layer=layer,
      model_layer=model_layer,
      usage_NxE=usage_NxE,
      entropy_bits_N=entropy,
      normalized_entropy_N=norm,
      top_m_coverage_N=routing_stats.top_m_coverage(usage_NxE, m),
      top_expert_N=np.where(routed_N, top, -1),
      top_expert_share_N=np.where(
          routed_N, p_NxE[np.arange(len(top)), top], np.nan
      ),
      mi_bits=routing_stats.mutual_information(usage_NxE, "uniform"),
      nmi=routing_stats.normalized_mutual_information(usage_NxE, "uniform"),
      mi_within_partition_bits_P=within,
      js_NxN=routing_stats.js_divergence_matrix(usage_NxE),
  )


def build_report(
    counts: routing_counts.RoutingCounts,
    config: decoder_config.DecoderConfig,
    scheme: schemes.PartitionScheme,
    top_m: int,
    language_results: Optional[Mapping[str, Mapping[str, float]]] = None,
    weighted: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
) -> RoutingReport:
  """Statistics of every MoE layer of `counts`.

  Args:
    counts: routing with global expert ids over the 16 study languages.
    config: the model (sharing, experts, MoE layers).
    scheme: its tier-1 partition scheme.
    top_m: m of the top-m coverage, 1..E.
    language_results: optional per-language loss / bpb to put in the CSV.
    weighted: use gate mass instead of slot counts.
    metadata: extra JSON fields.
  """
  want = (languages.NUM_LANGUAGES, len(config.moe_layers))
  want += (config.num_partitions * config.num_experts,)
  if counts.shape != want:
    raise ValueError(
        f"counts have shape {counts.shape}; the config needs {want} "
        "(languages, MoE layers, P * E global experts)."
    )
  if scheme.num_partitions != config.num_partitions:
    raise ValueError(
        f"Scheme {scheme.name!r} has {scheme.num_partitions} partitions, "
        f"the model {config.num_partitions}."
    )
  check_top_m(top_m, config)
  partition_N = scheme.language_to_partition_table()
  layers = tuple(
      _layer_stats(
          counts.usage(m, weighted),
          top_m,
          config.moe_layers[m],
          m,
          partition_N,
          config,
      )
      for m in range(counts.shape[1])
  )
  return RoutingReport(
      codes=languages.CODES,
      partition_N=partition_N,
      experts_per_partition=config.num_experts,
      sharing=config.sharing,
      top_m=top_m,
      counts=counts,
      layers=layers,
      language_results=dict(language_results or {}),
      metadata=dict(metadata or {}),
  )


def _num(x) -> Optional[float]:
  """JSON / CSV number: NaN becomes None (JSON null, empty CSV cell)."""
  x = float(x)
  return None if math.isnan(x) else x


def csv_rows(report: RoutingReport) -> list[dict[str, Any]]:
  """One dict per (MoE layer, language), keys `CSV_COLUMNS`."""
  rows = []
  for s in report.layers:
    tokens_N = report.counts.tokens_NxM[:, s.layer]
    for i, code in enumerate(report.codes):
      result = report.language_results.get(code, {})
      rows.append(
          {
              "layer": s.layer,
              "model_layer": s.model_layer,
              "language": code,
              "partition": int(report.partition_N[i]),
              "tokens": int(tokens_N[i]),
              "loss": _num(result.get("loss", math.nan)),
              "bits_per_byte": _num(result.get("bpb", math.nan)),
              "entropy_bits": _num(s.entropy_bits_N[i]),
              "normalized_entropy": _num(s.normalized_entropy_N[i]),
              "top_m": report.top_m,
              "top_m_coverage": _num(s.top_m_coverage_N[i]),
              "top_expert": int(s.top_expert_N[i]),
              "top_expert_share": _num(s.top_expert_share_N[i]),
          }
      )
  return rows


def _matrix(a) -> list:
  return [[_num(x) for x in row] for row in np.asarray(a, np.float64)]


def as_json(report: RoutingReport) -> dict[str, Any]:
  """The JSON document: metadata, per-language rows and per-layer matrices."""
  return {
      **report.metadata,
      "languages": list(report.codes),
      "partitions": [int(p) for p in report.partition_N],
      "experts_per_partition": report.experts_per_partition,
      "sharing": report.sharing,
      "top_m": report.top_m,
      "expert_ids": (
          "global: partition q's expert e is q * experts_per_partition + e"
          if report.sharing != "all"
          else "one pool of num_partitions * experts_per_partition experts"
      ),
      "rows": csv_rows(report),
      "layers": [
          {
              "layer": s.layer,
              "model_layer": s.model_layer,
              "mutual_information_bits": _num(s.mi_bits),
              "normalized_mutual_information": _num(s.nmi),
              "mutual_information_within_partition_bits": [
                  _num(x) for x in s.mi_within_partition_bits_P
              ],
              "usage_counts": _matrix(s.usage_NxE),
              "js_divergence_bits": _matrix(s.js_NxN),
          }
          for s in report.layers
      ],
  }


def _csv_text(rows) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if v is None else v for k, v in row.items()})
  return out.getvalue()


def write_report(
    report: RoutingReport, output_dir: str, make_plots: bool = True
) -> dict[str, str]:
  """Writes the CSV, JSON and (optionally) PNGs; each file atomically.

  Returns:
    {'csv' | 'json' | 'usage_png' | 'js_png_<m>': path}.
  """
  os.makedirs(output_dir, exist_ok=True)
  paths = {
      "csv": os.path.join(output_dir, CSV_NAME),
      "json": os.path.join(output_dir, JSON_NAME),
  }
  atomic_file.write_text(paths["csv"], _csv_text(csv_rows(report)))
  atomic_file.write_text(
      paths["json"], json.dumps(as_json(report), indent=1, allow_nan=False)
  )
  if make_plots:
    title = f"sharing={report.sharing}, expert ids global"
    paths["usage_png"] = str(
        plots.plot_usage_heatmaps(
            np.stack([s.usage_NxE for s in report.layers], axis=1),
            os.path.join(output_dir, USAGE_PNG),
            codes=report.codes,
            title=title,
        )
    )
    for s in report.layers:
      paths[f"js_png_{s.layer}"] = str(
          plots.plot_js_matrix(
              s.js_NxN,
              os.path.join(output_dir, js_png_name(s.layer)),
              codes=report.codes,
              title=f"JS divergence (bits), MoE layer {s.layer}",
          )
      )
  return paths
