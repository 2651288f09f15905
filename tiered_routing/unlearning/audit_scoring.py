"""Scoring for the unlearning audits: token statistics, routing replay.

`forget_audits` attacks each method's model through these functions: the
per-token log-likelihood and Min-K%++ statistic of paragraph rows with the
expert usage they route to (`token_stats`), the forget loss with another
model's routing replayed (`replay_nll`), and the divergence of two expert
usages (`js_bits`). A model is scored as it is served: partition q alone
under strict partitions, else the whole model with q's block filled
(`view`); a dropped partition (no model) scores the uniform distribution.
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.analysis import routing_stats
from tiered_routing.data import feature_rows
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import routing_capture
from tiered_routing.model import transformer
from tiered_routing.tier1 import one_partition
from tiered_routing.unlearning import membership_inference as mia
from tiered_routing.unlearning import methods

_CHUNK_ROWS = 16


@functools.lru_cache(maxsize=None)
def _stats_fn(config):
  """Jitted (params, batch, mask) -> (logp, minkpp, expert usage [M, E])."""
  model = transformer.TieredDecoder(config)
  experts = config.experts_per_layer

  def stats(params, batch, mask):
    out = forward_lib.forward(
        model, params, batch, expert_mask_MxPxE=mask, capture_routing=True
    )
    logp, minkpp = mia.token_statistics(
        out.logits_PxBxLxV, batch["decoder_target_tokens"]
    )
    valid_T = batch["decoder_loss_weights"].reshape(-1) > 0
    routing = out.routing
    used_MxTxK = (routing.combine_weights_MxTxK != 0) & valid_T[None, :, None]
    one_hot = jax.nn.one_hot(routing.expert_index_MxTxK, experts)
    usage_MxE = jnp.sum(one_hot * used_MxTxK[..., None], axis=(1, 2))
    return logp, minkpp, usage_MxE

  return jax.jit(stats)


@functools.lru_cache(maxsize=None)
def _replay_fn(config):
  """Jitted (original params, params, batch) -> log p of the targets with
  the original's routing replayed through `params`."""
  model = transformer.TieredDecoder(config)

  def replayed(original, params, batch):
    routing = forward_lib.forward(
        model, original, batch, capture_routing=True
    ).routing
    mask = routing_capture.replay_mask(
        routing, batch["decoder_input_tokens"].shape,
        config.experts_per_layer,
    )
    logits = forward_lib.forward(
        model, params, batch, expert_mask_MxPxBxLxE=mask
    ).logits_PxBxLxV
    return mia.token_statistics(logits, batch["decoder_target_tokens"])[0]

  return jax.jit(replayed)


def view(c, model: methods.Model, q: int):
  """(config, params, mask, block, blocks): partition q's model alone under
  strict partitions, else the whole model with q's block filled."""
  cfg = model.config or c.spec.model_config
  mask = model.expert_mask_MxPxE
  if c.strict:
    params = one_partition.partition_params(model.params, q)
    mask = None if mask is None else np.asarray(mask)[:, q : q + 1]
    return one_partition.one_partition_config(cfg), params, mask, 0, 1
  return cfg, model.params, mask, q, cfg.num_partitions


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """A model's statistics on N rows: logp, minkpp [N, L], usage [M, E]."""

  logp: np.ndarray
  minkpp: np.ndarray
  usage: Optional[np.ndarray]


def token_stats(c, model: Optional[methods.Model], q: int, rows) -> TokenStats:
  """`model`'s statistics on rows of partition q (None: uniform, no
  routing: the partition was dropped)."""
  n, length = rows["decoder_target_tokens"].shape
  if model is None or not n:  # No model, or no rows: nothing to route.
    uniform = -math.log(c.spec.model_config.vocab_size)
    return TokenStats(
        np.full((n, length), uniform), np.zeros((n, length)), None
    )
  cfg, params, mask, block, blocks = view(c, model, q)
  fn = _stats_fn(cfg)
  logp, minkpp, usage = [], [], 0.0
  for chunk in feature_rows.chunk_rows(rows, _CHUNK_ROWS):
    batch = c.to_device(feature_rows.place_block(chunk, block, blocks))
    lp, mk, us = jax.device_get(fn(params, batch, mask))
    logp.append(lp[block])
    minkpp.append(mk[block])
    usage = usage + us
  cut = lambda parts: np.concatenate(parts)[:n]
  return TokenStats(cut(logp), cut(minkpp), np.asarray(usage))


def replay_nll(c, model: methods.Model, q: int, rows) -> float:
  """Mean NLL of `rows` (partition q) under `model`'s weights with the
  original model's routing replayed (its own expert mask, if any, is
  replaced too: a mask is a routing change)."""
  of = lambda params: view(c, methods.Model(params), q)
  cfg, original, _, block, blocks = of(c.original)
  params = of(model.params)[1]
  fn = _replay_fn(cfg)
  total, count = 0.0, 0
  for chunk in feature_rows.chunk_rows(rows, _CHUNK_ROWS):
    batch = c.to_device(feature_rows.place_block(chunk, block, blocks))
    logp = np.asarray(jax.device_get(fn(original, params, batch)))[block]
    weights = chunk["decoder_loss_weights"] > 0
    total, count = total - logp[weights].sum(), count + weights.sum()
  return float(total / count) if count else math.nan


def scores(c, stats: TokenStats, rows, texts) -> mia.ParagraphScores:
  return mia.paragraph_scores(
      stats.logp, stats.minkpp, rows["decoder_loss_weights"], texts,
      c.config.audits.minkpp_k,
  )


def mean_nll(stats: TokenStats, rows) -> float:
  """Mean NLL of the scored tokens of `rows` (NaN if there are none)."""
  weights = rows["decoder_loss_weights"] > 0
  return float(-stats.logp[weights].mean()) if weights.any() else math.nan


def js_bits(usage_a: Optional[np.ndarray], usage_b: Optional[np.ndarray]):
  """Mean over MoE layers of the JS divergence of two usages [M, E]."""
  if usage_a is None or usage_b is None:
    return math.nan
  per_layer = [
      routing_stats.js_divergence_matrix(np.stack([a, b]))[0, 1]
      for a, b in zip(usage_a, usage_b)
  ]
  return float(np.nanmean(per_layer)) if per_layer else math.nan
