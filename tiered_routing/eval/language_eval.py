"""The per-language evaluator: loss, bits per byte and routing of any params.

Every per-language number of the package comes from `LanguageEvaluator`:
the eval binary's report, the trade-off sweep's dozen parameter sets per
configuration (some with experts masked), the routing analysis of a
checkpoint, and the related-method tables (MoEfication, ESFT, expert
gates). Each language is scored by its own tier-1 partition: the evaluator
holds one block of [B, L] rows per partition (`data.eval_data`), stacks the
blocks into `[P, B, L]` batches (a partition with fewer batches gets all-zero
rows), and sums the token loss per language (`losses.per_language_sums`)
on the device. Bits per byte divide the summed loss (in bits) by the UTF-8
bytes of the detokenized scored tokens (`bytes_per_language`), which makes
models with different vocabularies comparable (Gao et al. 2020, "The Pile",
Sec. 5).

Strict partitions (sharing 'none') are P independent models, so with
`partitions_alone` partition q is evaluated as a one-partition model with
parameters `params[q]` (`tier1.one_partition`; the same computation on
fewer rows): one compiled program then serves every configuration with
sharing 'none' whatever P, and a method that changed only partition p is
rescored on p's languages alone.

With `capture_routing` every scored token's routing is counted
(`routing_counts.RoutingCounts`) with global expert ids: partition q's
private expert e is q * E + e (sharing 'none' / 'attention'); under 'all' the
P * E experts are one pool. So a language confined by tier 1 to its
partition's E experts shows up as concentrated in E of the model's P * E
experts.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from tiered_routing.data import eval_data
from tiered_routing.data import feature_rows
from tiered_routing.eval import lm_metrics
from tiered_routing.eval import routing_counts
from tiered_routing.model import decoder_config
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import losses
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import layout
from tiered_routing.tier1 import one_partition

Batch = Mapping[str, np.ndarray]
# {code: {'loss', 'bpb', 'tokens', 'bytes'}}: the trade-off sweep's format.
LanguageResults = dict[str, dict[str, float]]


def bytes_per_language(batch: Batch, vocabulary: seqio.Vocabulary):
  """int64 [N]: UTF-8 bytes of the detokenized scored tokens per language.

  Each packed segment (a row when unpacked) is decoded on its own; only
  tokens with a non-zero loss weight count.
  """
  out = np.zeros(languages.NUM_LANGUAGES, np.int64)
  targets = batch["decoder_target_tokens"].reshape(
      -1, batch["decoder_target_tokens"].shape[-1]
  )
  weights = batch["decoder_loss_weights"].reshape(targets.shape)
  langs = batch["decoder_language_ids"].reshape(targets.shape)
  segments = batch.get("decoder_segment_ids")
  segments = (
      (weights > 0).astype(np.int32)
      if segments is None
      else segments.reshape(targets.shape)
  )
  for row in range(targets.shape[0]):
    for seg in np.unique(segments[row][segments[row] > 0]):
      mask = (segments[row] == seg) & (weights[row] > 0)
      if mask.any():
        text = vocabulary.decode(targets[row][mask].tolist())
        out[langs[row][mask][0]] += len(text.encode("utf-8"))
  return out


def _language_sums(params, batch, expert_mask_MxPxE, *, model, routing):
  """Per-language loss sums (and every token's routing) of one batch."""
  out = forward_lib.forward(
      model,
      params,
      batch,
      expert_mask_MxPxE=expert_mask_MxPxE,
      capture_routing=routing,
  )
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  _, _, ce = losses.cross_entropy_loss(
      out.logits_PxBxLxV, batch["decoder_target_tokens"], weights
  )
  loss_sum, weight_sum = losses.per_language_sums(
      ce, weights, batch["decoder_language_ids"]
  )
  sums = {"loss_sum_N": loss_sum, "weight_sum_N": weight_sum}
  if routing:
    sums["expert_index_MxTxK"] = out.routing.expert_index_MxTxK
    sums["combine_weights_MxTxK"] = out.routing.combine_weights_MxTxK
  return sums


@functools.lru_cache(maxsize=None)
def _compiled(config: decoder_config.DecoderConfig, routing: bool):
  """The jitted `_language_sums` of one model config (built once)."""
  return jax.jit(
      functools.partial(
          _language_sums,
          model=transformer.TieredDecoder(config),
          routing=routing,
      )
  )


def _traced_in(context: Callable[[], Any], fn: Callable) -> Callable:
  """`fn` jitted with `context()` active while it is traced (e.g.
  `related.moefied_decoder.moefied`, which intercepts module calls)."""

  def traced(*args):
    with context():
      return fn(*args)

  return jax.jit(traced)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Per-language metrics (and routing) of one evaluation.

  Attributes:
    losses: `LossStats` of every evaluated language, canonical order.
    routing: counts per (language, MoE layer, global expert), if captured.
  """

  losses: dict[str, lm_metrics.LossStats]
  routing: Optional[routing_counts.RoutingCounts] = None

  def flat(self) -> dict[str, float]:
    """'{code}/{metric}', pooled 'all/...' and language-mean 'macro/...'."""
    acc = lm_metrics.LanguageLossAccumulator()
    for code, s in self.losses.items():
      acc.add(code, s.nll_sum, s.num_tokens, s.num_bytes)
    return acc.results()

  def language_results(self) -> LanguageResults:
    """{code: {'loss', 'bpb', 'tokens', 'bytes'}} (the sweep's format)."""
    return {
        code: {
            "loss": s.loss,
            "bpb": s.bits_per_byte if s.num_bytes else float("nan"),
            "tokens": s.num_tokens,
            "bytes": s.num_bytes,
        }
        for code, s in self.losses.items()
    }


class LanguageEvaluator:
  """Evaluates parameter sets of one model config on fixed rows.

  Args:
    config: the model.
    blocks: per tier-1 partition, its evaluation rows as [B, L] host
      batches (`data.eval_data`): a list can be evaluated any number of
      times, an iterator once.
    vocabulary: the targets' SeqIO vocabulary (for bytes); None = no bytes
      (and no bits per byte), e.g. when only routing is wanted.
    to_device: places a host batch (e.g. `sharding.to_global_batch`).
    partitions_alone: evaluate each partition as a one-partition model (needs
      sharing 'none'); default: whenever the sharing is 'none'.
  """

  def __init__(
      self,
      config: decoder_config.DecoderConfig,
      blocks: Sequence[Iterable[Batch]],
      vocabulary: Optional[seqio.Vocabulary],
      *,
      to_device: Callable[[Batch], Batch] = lambda b: b,
      partitions_alone: Optional[bool] = None,
  ):
    if len(blocks) != config.num_partitions:
      raise ValueError(
          f"Got rows of {len(blocks)} partitions for a model with "
          f"num_partitions={config.num_partitions}."
      )
    if partitions_alone is None:
      partitions_alone = config.sharing == "none"
    if partitions_alone and config.sharing != "none":
      raise ValueError(
          "partitions_alone needs sharing 'none'; with sharing "
          f"{config.sharing!r} every language depends on shared parameters."
      )
    self.config = config
    self.partitions_alone = partitions_alone
    self._blocks = list(blocks)
    self._vocabulary = vocabulary
    self._to_device = to_device
    self._bytes: dict[tuple[int, int], np.ndarray] = {}

  def _block_bytes(self, q: int, b: int, batch: Batch) -> np.ndarray:
    """Bytes per language of batch b of partition q, decoded once."""
    key = (q, b)
    if key not in self._bytes:
      self._bytes[key] = (
          np.zeros(languages.NUM_LANGUAGES, np.int64)
          if self._vocabulary is None
          else bytes_per_language(batch, self._vocabulary)
      )
    return self._bytes[key]

  def full_batches(self) -> Iterable[tuple[Batch, np.ndarray]]:
    """[P, B, L] host batches of every partition's rows, with their bytes
    per language."""
    for b, blocks in enumerate(itertools.zip_longest(*self._blocks)):
      template = next(x for x in blocks if x is not None)
      nbytes = sum(
          self._block_bytes(q, b, x)
          for q, x in enumerate(blocks)
          if x is not None
      )
      batch = feature_rows.stack(
          [feature_rows.zeros_like(template) if x is None else x
           for x in blocks],
          axis=0,
      )
      yield batch, nbytes

  def _partition_batches(self, q: int) -> Iterable[tuple[Batch, np.ndarray]]:
    for b, batch in enumerate(self._blocks[q]):
      nbytes = self._block_bytes(q, b, batch)
      yield {k: v[None] for k, v in batch.items()}, nbytes

  @staticmethod
  def _default_mask(cfg) -> Optional[np.ndarray]:
    """An all-allowed per-layer mask: masked and unmasked evaluations then
    share one compiled program."""
    if not cfg.num_experts:
      return None
    shape = (len(cfg.moe_layers), cfg.num_partitions, cfg.experts_per_layer)
    return np.ones(shape, bool)

  def evaluate(
      self,
      params: Any,
      *,
      expert_mask_MxPxE: Optional[np.ndarray] = None,
      partitions: Optional[Sequence[int]] = None,
      capture_routing: bool = False,
      trace_context: Optional[Callable[[], Any]] = None,
      config: Optional[decoder_config.DecoderConfig] = None,
  ) -> EvalResult:
    """Scores every language (or those of some partitions) on its rows.

    Args:
      params: the model's parameters (all partitions).
      expert_mask_MxPxE: bool [M, P, E] (True = allowed); None = all allowed.
      partitions: with `partitions_alone`, evaluate only these partitions.
      capture_routing: also count every scored token's routing.
      trace_context: returns a context manager that must be active while
        the model is traced (e.g. MoEfication's `moefied`).
      config: evaluate a model of another config on the same rows (e.g.
        with an expert added); default the evaluator's.
    """
    cfg = self.config if config is None else config
    if cfg.num_partitions != self.config.num_partitions:
      raise ValueError(
          f"config has num_partitions={cfg.num_partitions}; the rows are laid"
          f" out for {self.config.num_partitions}."
      )
    if partitions is not None and not self.partitions_alone:
      raise ValueError(
          "partitions= needs partitions_alone (sharing 'none'); with sharing"
          f" {self.config.sharing!r} every language depends on the shared "
          "parameters."
      )
    mask = self._default_mask(cfg) if expert_mask_MxPxE is None else (
        np.asarray(expert_mask_MxPxE))
    acc = lm_metrics.LanguageLossAccumulator()
    counts = new_counts(cfg) if capture_routing else None
    if not self.partitions_alone:
      fn = _evaluation_fn(cfg, capture_routing, trace_context)
      run = _Run(fn, self._to_device, acc, counts, cfg)
      run(params, mask, self.full_batches(), None)
      return EvalResult(acc.per_language(), counts)
    one = one_partition.one_partition_config(cfg)
    run = _Run(_evaluation_fn(one, capture_routing, trace_context),
               self._to_device, acc, counts, cfg)
    todo = range(cfg.num_partitions) if partitions is None else partitions
    for q in todo:
      run(one_partition.partition_params(params, q),
          None if mask is None else mask[:, q : q + 1],
          self._partition_batches(q), q)
    return EvalResult(acc.per_language(), counts)


def new_counts(
    cfg: decoder_config.DecoderConfig,
) -> routing_counts.RoutingCounts:
  """Empty routing counts with the model's global expert ids."""
  return routing_counts.RoutingCounts(
      len(cfg.moe_layers), cfg.num_partitions * cfg.num_experts
  )


def _evaluation_fn(config, routing, trace_context):
  if trace_context is None:
    return _compiled(config, routing)
  model = transformer.TieredDecoder(config)
  return _traced_in(
      trace_context,
      functools.partial(_language_sums, model=model, routing=routing),
  )


@dataclasses.dataclass(frozen=True)
class _Run:
  """Adds the loss sums (and routing) of batches to an accumulator."""

  fn: Callable
  to_device: Callable
  acc: lm_metrics.LanguageLossAccumulator
  counts: Optional[routing_counts.RoutingCounts]
  config: decoder_config.DecoderConfig

  def __call__(self, params, mask, batches, partition):
    mask = None if mask is None else jnp.asarray(mask)
    for batch, nbytes in batches:
      out = jax.device_get(self.fn(params, self.to_device(batch), mask))
      self.acc.add_language_sums(
          out["loss_sum_N"], out["weight_sum_N"], nbytes
      )
      if self.counts is not None:
        self._count(out, batch, partition)

  def _count(self, out, batch, partition):
    """Adds one batch's routing with global expert ids."""
    e = self.config.num_experts
    shape = batch["decoder_input_tokens"].shape
    if partition is not None:
      offset = partition * e
    else:
      offset = layout.global_expert_offsets(shape, e, self.config.sharing)
    valid = batch["decoder_loss_weights"].reshape(-1) > 0
    lang = batch["decoder_language_ids"].reshape(-1)
    for layer in range(out["expert_index_MxTxK"].shape[0]):
      self.counts.add(
          layer,
          out["expert_index_MxTxK"][layer] + offset,
          out["combine_weights_MxTxK"][layer],
          lang,
          valid,
      )


def split_evaluator(
    config: decoder_config.DecoderConfig,
    names: Sequence[str],
    length: int,
    rows: int,
    *,
    split: str = "validation",
    pack: bool = True,
    materialize: bool = True,
    **kwargs,
) -> LanguageEvaluator:
  """The evaluator of every partition mixture's whole `split`.

  Args:
    config: the model.
    names: one task or mixture per partition.
    length: L.
    rows: rows per partition of a batch.
    split: the split.
    pack: pack several sequences per row (the eval binary's layout).
    materialize: keep the rows in memory, so that the evaluator can score
      several parameter sets; False streams them (one evaluation).
    **kwargs: passed to `LanguageEvaluator` (to_device, partitions_alone).
  """
  blocks = eval_data.partition_blocks(names, length, rows, split, pack)
  if materialize:
    blocks = [list(b) for b in blocks]
  vocabulary = eval_data.vocabulary_of(names[0])
  return LanguageEvaluator(config, blocks, vocabulary, **kwargs)
