"""Per-language validation loss, bits per byte and routing of in-memory params.

The evaluation binary (`tiered_routing.eval`) scores a checkpoint; an
unlearning sweep scores a dozen parameter sets per configuration, some with
experts masked, so `LanguageEvaluator` works on parameters in memory and
takes an optional per-layer expert mask. The numbers are the binary's: every
language's whole validation split, each through its own tier-1 partition,
loss summed per language (`trainer.per_language_sums`) and bits per byte over
the UTF-8 bytes of the detokenized scored text (`eval.bytes_per_language`).
Each call also returns the routing of every scored token
(`analysis.routing_stats.RoutingCounts`), from which the forget language's
compartmentalization is read.

Expert ids in the routing counts are global: partition q's private expert e
is q * E + e (sharing 'none' / 'attention'); under 'all' the P * E experts are
one pool. So a language confined by tier 1 to its partition's E experts shows
up as concentrated in E of the model's P * E experts.

Strict partitions (sharing 'none') are P independent models, so partition q
is evaluated as a one-partition model with parameters `params[q]` (the same
computation on fewer rows): one compiled program serves every configuration
with sharing 'none', whatever P, and a method that changed only partition p
is evaluated on p's languages alone.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.cli import eval as eval_lib
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import trainer
from tiered_routing.analysis import routing_stats
from tiered_routing.eval import lm_metrics
from tiered_routing.model import losses
from tiered_routing.tier1 import one_partition
from tiered_routing.model import transformer
from tiered_routing.data import stream_cache
from tiered_routing.model import routing_capture

LanguageResults = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Per-language metrics and routing of one evaluation.

  Attributes:
    languages: {code: {'loss', 'bpb', 'tokens', 'bytes'}} for every
      evaluated language (`unlearning.metrics` reads 'loss' and 'bpb').
    routing: counts per (language, MoE layer, global expert).
  """

  languages: LanguageResults
  routing: routing_stats.RoutingCounts


def _eval_step(params, batch, expert_mask_MxPxE, *, model):
  """Per-language loss sums and every token's routing of one batch."""
  logits, routing, _ = routing_capture.apply_with_routing(
      model,
      {"params": params},
      batch["decoder_input_tokens"],
      segment_ids_PxBxL=batch.get("decoder_segment_ids"),
      positions_PxBxL=batch.get("decoder_positions"),
      expert_mask_MxPxE=expert_mask_MxPxE,
      deterministic=True,
  )
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce = losses.cross_entropy_loss(
      logits, batch["decoder_target_tokens"], weights
  )
  loss_sum, weight_sum = trainer.per_language_sums(
      ce, weights, batch["decoder_language_ids"]
  )
  return {
      "loss_sum_N": loss_sum,
      "weight_sum_N": weight_sum,
      "expert_index_LxTxK": routing.expert_index_LxTxK,
      "combine_weights_LxTxK": routing.combine_weights_LxTxK,
  }


@functools.lru_cache(maxsize=None)
def eval_fn(config: transformer.DecoderConfig):
  """The jitted `_eval_step` of one model config (built once)."""
  return jax.jit(
      functools.partial(_eval_step, model=transformer.TieredDecoder(config))
  )


def check_moe(config: transformer.DecoderConfig) -> None:
  if not config.num_experts:
    raise ValueError(
        "Unlearning by experts needs a MoE model; got "
        f"num_experts={config.num_experts}."
    )


class LanguageEvaluator:
  """Evaluates parameter sets of one model config on every language.

  Args:
    config: the model.
    scheme: tier-1 partition of the languages (which partition scores which
      language).
    validation: {code: {feature: [n, L]}} all validation rows of each
      language (`streams.DataCache.validation_rows`).
    vocabulary: the targets' SeqIO vocabulary (for bytes).
    rows_per_batch: R, rows per partition of an evaluation batch.
    to_device: places a host batch (e.g. `trainer.to_global_batch` on a
      mesh).
  """

  def __init__(
      self,
      config: transformer.DecoderConfig,
      scheme: schemes.PartitionScheme,
      validation: Mapping[str, stream_cache.Rows],
      vocabulary,
      rows_per_batch: int,
      to_device=lambda b: b,
  ):
    check_moe(config)
    if scheme.num_partitions != config.num_partitions:
      raise ValueError(
          f"Scheme {scheme.name!r} has {scheme.num_partitions} "
          f"partitions, the model {config.num_partitions}."
      )
    missing = [c for c in languages.CODES if c not in validation]
    if missing:
      raise ValueError(f"No validation rows for languages {missing}.")
    self.config, self.scheme = config, scheme
    self.strict = config.sharing == "none"
    self._to_device = to_device
    self.num_bytes = {
        c: int(
            eval_lib.bytes_per_language(validation[c], vocabulary)[
                languages.language_id(c)
            ]
        )
        for c in languages.CODES
    }
    self._chunks = [
        stream_cache.chunk_rows(
            {
                k: np.concatenate([validation[c][k] for c in codes])
                for k in validation[codes[0]]
            },
            rows_per_batch,
        )
        for codes in scheme.partitions
    ]

  @property
  def num_global_experts(self) -> int:
    return self.config.num_partitions * self.config.num_experts

  def new_counts(self) -> routing_stats.RoutingCounts:
    return routing_stats.RoutingCounts(
        len(self.config.moe_layers), self.num_global_experts
    )

  def _full_batches(self):
    for b in range(max(len(c) for c in self._chunks)):
      blocks = [
          c[b] if b < len(c) else stream_cache.zeros_like(c[0]) for c in self._chunks
      ]
      yield stream_cache.stack(blocks, axis=0)

  def run(
      self,
      params: Any,
      batches,
      expert_mask_MxPxE=None,
      partition: Optional[int] = None,
      sums=None,
      counts=None,
  ):
    """Adds the loss sums and routing of `batches` to `sums` / `counts`.

    Args:
      params: the model's parameters (all partitions).
      batches: iterable of [P', R, L] host batches: P' = 1 with `partition`
        set (strict partitions: that partition's one-partition model), else
        P' = P.
      expert_mask_MxPxE: bool [M, P, E] (True = allowed); None = all allowed.
      partition: see `batches`.
      sums: {code: [nll, tokens]} to add to (new if None).
      counts: `RoutingCounts` to add to (new if None).

    Returns:
      (sums, counts).
    """
    cfg, e = self.config, self.config.num_experts
    sums = {} if sums is None else sums
    counts = self.new_counts() if counts is None else counts
    mask = (
        np.ones(
            (len(cfg.moe_layers), cfg.num_partitions, cfg.experts_per_layer),
            bool,
        )
        if expert_mask_MxPxE is None
        else np.asarray(expert_mask_MxPxE)
    )
    fn = eval_fn(cfg)
    if partition is not None:
      params = one_partition.partition_params(params, partition)
      mask = mask[:, partition : partition + 1]
      fn = eval_fn(one_partition.one_partition_config(cfg))
    mask = jnp.asarray(mask)
    for batch in batches:
      out = jax.device_get(fn(params, self._to_device(batch), mask))
      for i in np.flatnonzero(out["weight_sum_N"]):
        entry = sums.setdefault(languages.CODES[i], [0.0, 0.0])
        entry[0] += float(out["loss_sum_N"][i])
        entry[1] += float(out["weight_sum_N"][i])
      valid = batch["decoder_loss_weights"].reshape(-1) > 0
      lang = batch["decoder_language_ids"].reshape(-1)
      if partition is not None:
        offset = partition * e
      elif cfg.sharing == "attention":
        offset = (
            np.asarray(
                routing_capture.token_partition_ids(
                    batch["decoder_input_tokens"].shape
                )
            )[:, None]
            * e
        )
      else:
        offset = 0
      for layer in range(out["expert_index_LxTxK"].shape[0]):
        counts.add(
            layer,
            out["expert_index_LxTxK"][layer] + offset,
            out["combine_weights_LxTxK"][layer],
            lang,
            valid,
        )
    return sums, counts

  def evaluate(
      self,
      params: Any,
      expert_mask_MxPxE=None,
      partitions_to_score: Optional[Sequence[int]] = None,
  ) -> EvalResult:
    """Scores every language (or, for strict partitions, those of some
    partitions only) on its whole validation split."""
    if partitions_to_score is not None and not self.strict:
      raise ValueError(
          "partitions_to_score needs sharing 'none'; with "
          f"sharing {self.config.sharing!r} every language "
          "depends on the shared parameters."
      )
    sums, counts = {}, self.new_counts()
    if self.strict:
      for q in (
          range(self.config.num_partitions)
          if partitions_to_score is None
          else partitions_to_score
      ):
        batches = ({k: v[None] for k, v in b.items()} for b in self._chunks[q])
        self.run(params, batches, expert_mask_MxPxE, q, sums, counts)
    else:
      self.run(
          params, self._full_batches(), expert_mask_MxPxE, None, sums, counts
      )
    return EvalResult(self._results(sums), counts)

  def _results(self, sums) -> LanguageResults:
    out = {}
    for code in languages.CODES:
      if code not in sums:
        continue
      nll, tokens = sums[code]
      stats = lm_metrics.LossStats(nll, tokens, self.num_bytes[code])
      out[code] = {
          "loss": stats.loss,
          "bpb": stats.bits_per_byte,
          "tokens": tokens,
          "bytes": float(self.num_bytes[code]),
      }
    return out


def compartmentalization(
    counts: routing_stats.RoutingCounts, code: str, m: int
) -> dict[str, float]:
  """How concentrated a language is in experts, averaged over MoE layers.

  Args:
    counts: routing counts with global expert ids (`EvalResult.routing`).
    code: the language (e.g. the one to forget).
    m: experts counted by the top-m mass.

  Returns:
    comp_top_m (m), comp_top_m_mass (share of its routing in its m most used
    experts), comp_entropy (normalized entropy over all the model's experts),
    comp_specificity_bits (its KL term of I(L; E)) and comp_mi_bits (I(L; E)
    over all languages, uniform language prior).
  """
  layers = range(counts.shape[1])
  per_layer = [
      routing_stats.compartmentalization(counts.usage(l), code, m)
      for l in layers
  ]
  mi = [
      routing_stats.mutual_information(counts.usage(l), "uniform")
      for l in layers
  ]
  mean = lambda name: float(np.mean([getattr(c, name) for c in per_layer]))
  return {
      "comp_top_m": m,
      "comp_top_m_mass": mean("top_m_coverage"),
      "comp_entropy": mean("normalized_entropy"),
      "comp_specificity_bits": mean("specificity_bits"),
      "comp_mi_bits": float(np.mean(mi)),
  }
