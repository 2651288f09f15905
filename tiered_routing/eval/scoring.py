"""Every tier-1 partition's log-probabilities of the same unpacked rows.

Inference routing compares partitions on the same text, so every partition
scores every sequence: the rows of a [B, L] batch are copied into all P
blocks of the model's partition-grouped [P, B, L] input. Every block is
computed anyway in that layout, so a row costs the same whether the other
blocks hold copies or padding. The token log-probabilities are the negated
per-token cross-entropy of the eval step (`losses.cross_entropy_loss`).
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from tiered_routing import sharding
from tiered_routing.data import pipeline
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import losses
from tiered_routing.model import transformer


def _token_logprobs(params, batch, *, model):
  """log p_p(target) of every block, [P, B, L] (the eval step's CE)."""
  logits = forward_lib.forward(model, params, batch).logits_PxBxLxV
  _, _, ce = losses.cross_entropy_loss(logits, batch["decoder_target_tokens"])
  return -ce


class PartitionScorer:
  """Every partition's log-probability of the targets of [rows, L] batches.

  Call it inside `sharding.with_sharding_rules(mesh)`.
  """

  def __init__(
      self,
      model: transformer.TieredDecoder,
      params: Any,
      mesh: jax.sharding.Mesh,
      rows: int,
  ):
    self.num_partitions = model.config.num_partitions
    self.vocab_size = model.config.vocab_size
    self.rows = rows
    self._params, self._mesh = params, mesh
    self._fn = jax.jit(functools.partial(_token_logprobs, model=model))

  def __call__(self, batch_BxL: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [P, rows, L] for a batch already padded to `rows` rows."""
    tiled = {
        k: np.broadcast_to(v[None], (self.num_partitions,) + v.shape)
        for k, v in batch_BxL.items()
        if k in pipeline.MODEL_FEATURES
    }
    if tiled["decoder_target_tokens"].shape[1] != self.rows:
      raise ValueError(
          f"batch has {tiled['decoder_target_tokens'].shape[1]} rows; "
          f"expected rows={self.rows} (pad with pad_rows)"
      )
    out = self._fn(self._params, sharding.to_global_batch(tiled, self._mesh))
    return np.asarray(jax.device_get(out))


def row_texts(batch: Mapping[str, np.ndarray], vocabulary) -> list[str]:
  """The decoded scored tokens of every row ('' for padding rows)."""
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"] > 0
  return [
      vocabulary.decode(t[w].tolist()) if w.any() else ""
      for t, w in zip(targets, weights)
  ]
