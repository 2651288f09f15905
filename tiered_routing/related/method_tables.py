"""What the related-method binaries share: row comparisons and tables.

The MoEfication, ESFT and expert-gates binaries evaluate parameter sets with
the per-language evaluator (`eval.language_eval`, on the eval binary's
packed validation batches); this module compares two models' logits row by
row (did a change touch rows it should not have?) and writes their Markdown
tables.
"""

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.eval import language_eval
from tiered_routing.model import decoder_config
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import transformer
from tiered_routing.tier1 import languages
from tiered_routing.train import atomic_file


@functools.lru_cache(maxsize=None)
def forward_fn(config: decoder_config.DecoderConfig):
  """Jitted (logits, TokenRouting) of a config (cached: compiled once)."""
  model = transformer.TieredDecoder(config)

  @jax.jit
  def run(params, batch):
    out = forward_lib.forward(model, params, batch, capture_routing=True)
    return out.logits_PxBxLxV, out.routing

  return run


def compare_rows(
    evaluator: language_eval.LanguageEvaluator,
    before,
    after,
    exclude: str,
    on_fn=None,
):
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
  base_fn, fn = forward_fn(base_config), forward_fn(config)
  on_count = changed = total = 0
  max_diff = 0.0
  excluded = languages.language_id(exclude)
  keys = ("decoder_input_tokens", "decoder_segment_ids", "decoder_positions")
  for batch, _ in evaluator.full_batches():
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


def write_table(
    path: str,
    header: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
) -> str:
  """Prints `header` and the table, and writes them to `path` atomically."""
  text = header + markdown_table(rows, columns) + "\n"
  print(text)
  atomic_file.write_text(path, text)
  return text
