"""Per-language evaluation and result tables for the method scripts.

Shared by scripts/moefy.py, scripts/expert_gates.py and scripts/finetune.py
(the related-methods experiments; they restore parameters with
`tiered_routing.analysis.restore`): evaluate any parameters on whole SeqIO validation splits per language
(the batches of the eval binary, `tiered_routing.eval.eval_batches`),
compare two models' logits row by row, and write Markdown tables.
"""

import contextlib
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from tiered_routing.cli import eval as eval_lib
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import trainer
from tiered_routing.eval import lm_metrics
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.model import routing_capture


class Evaluator:
  """Per-language validation loss of any parameters of one model layout.

  The validation batches are built once and reused for every evaluation.
  """

  def __init__(
      self,
      names: Sequence[str],
      scheme: schemes.PartitionScheme,
      length: int,
      rows: int,
      split: str = "validation",
  ):
    self.batches = list(
        eval_lib.eval_batches(names, scheme, length, rows, split)
    )
    vocabulary = (
        seqio.get_mixture_or_task(names[0])
        .output_features["targets"]
        .vocabulary
    )
    self.num_bytes = [
        eval_lib.bytes_per_language(b, vocabulary) for b in self.batches
    ]

  def evaluate(
      self,
      model: Any,
      params: Any,
      context: Callable[[], Any] = contextlib.nullcontext,
  ) -> dict[str, float]:
    """Flat '{code}/loss', 'all/loss', 'macro/loss', bits per byte, ...

    Args:
      model: a `TieredDecoder` or a stand-in with its `apply`.
      params: its parameters.
      context: returns a context manager active while the step is traced
        (e.g. `moefication.moefied`).
    """

    def step(params, batch):
      with context():
        return trainer.eval_step(params, batch, model=model)

    step = jax.jit(step)
    acc = lm_metrics.LanguageLossAccumulator()
    for batch, num_bytes in zip(self.batches, self.num_bytes):
      sums = jax.device_get(
          step(
              params,
              {k: batch[k] for k in trainer.MODEL_FEATURES if k in batch},
          )
      )
      acc.add_language_sums(
          sums["loss_sum_N"], sums["weight_sum_N"], num_bytes
      )
    return acc.results()


@functools.lru_cache(maxsize=None)
def _forward_fn(config: decoder_config.DecoderConfig):
  """Jitted (logits, TokenRouting) of a config (cached: compiled once)."""
  model = transformer.TieredDecoder(config)

  @jax.jit
  def forward(params, batch):
    logits, routed, _ = routing_capture.apply_with_routing(
        model,
        {"params": params},
        batch["decoder_input_tokens"],
        segment_ids_PxBxL=batch["decoder_segment_ids"],
        positions_PxBxL=batch["decoder_positions"],
    )
    return logits, routed

  return forward


def compare_rows(evaluator, before, after, exclude: str, on_fn=None):
  """How far another model's logits moved on validation rows.

  Args:
    evaluator: its batches are compared.
    before: (config, params) of the reference model.
    after: (config, params) of the changed model.
    exclude: language code whose rows are left out (e.g. a new language).
    on_fn: optional `on_fn(routing before, routing after)` -> bool [T]
      marking tokens 'on' a changed expert; a row is on it if any scored
      token is.

  Returns:
    (share of rows on it, share of rows whose logits changed at all, max
    |logit change| over rows not on it). Rows hold packed sequences of one
    language each.
  """
  (base_config, base), (config, params) = before, after
  base_fn, fn = _forward_fn(base_config), _forward_fn(config)
  on_count = changed = total = 0
  max_diff = 0.0
  excluded = languages.language_id(exclude)
  keys = ("decoder_input_tokens", "decoder_segment_ids", "decoder_positions")
  for batch in evaluator.batches:
    inputs = {k: jnp.asarray(batch[k]) for k in keys}
    old_logits, base_routed = base_fn(base, inputs)
    logits, routed = fn(params, inputs)
    valid = batch["decoder_loss_weights"] > 0
    uses = np.zeros(valid.shape, bool)
    if on_fn is not None:
      uses = np.asarray(on_fn(base_routed, routed)).reshape(valid.shape)
    diff_BxL = np.abs(np.asarray(logits) - np.asarray(old_logits)).max(-1)
    diff = np.where(valid, diff_BxL, 0.0).max(-1)
    is_excluded = batch["decoder_language_ids"] == excluded
    row = (valid & ~is_excluded).any(-1) & ~(valid & is_excluded).any(-1)
    row_on = (uses & valid).any(-1)
    on_count += int((row & row_on).sum())
    changed += int((row & (diff > 0)).sum())
    total += int(row.sum())
    max_diff = max(max_diff, float(diff[row & ~row_on].max(initial=0)))
  return on_count / max(total, 1), changed / max(total, 1), max_diff


def mean_loss(results: Mapping[str, float], codes: Sequence[str]) -> float:
  """Unweighted mean validation loss over the languages `codes`."""
  return float(np.mean([results[f"{c}/loss"] for c in codes]))


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> str:
  """A Markdown table; floats with 4 decimals."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = [
      "| " + " | ".join(columns) + " |",
      "|" + "|".join("---" for _ in columns) + "|",
  ]
  lines += [
      "| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows
  ]
  return "\n".join(lines)
