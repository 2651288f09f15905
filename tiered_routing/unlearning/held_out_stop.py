"""Stopping gradient unlearning at a target forget quality, measured held out.

Gradient ascent does not stop by itself, so a method's result depends on
when it is stopped. Methods are compared at (within one step of) the same
forget quality: each stops after the first step whose NLL on a fixed
batch of the forget language's *held-out* text reaches the target, the
never-saw-it reference model's NLL on the same rows (at most log V, the
uniform distribution's). Stopping on the training batch's own loss instead
would reward memorizing that batch, and methods would overshoot unequally.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from tiered_routing.model import decoder_config
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import transformer
from tiered_routing.unlearning import objectives


@functools.lru_cache(maxsize=None)
def _nll_fn(model_config: decoder_config.DecoderConfig):
  model = transformer.TieredDecoder(model_config)

  def nll(params, batch):
    logits = forward_lib.forward(model, params, batch).logits_PxBxLxV
    logp = objectives.token_log_likelihood(
        logits, batch["decoder_target_tokens"]
    )
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    return objectives.mean_nll(logp, weights)

  return jax.jit(nll)


def mean_nll(
    model_config: decoder_config.DecoderConfig, params: Any, batch: Any
) -> float:
  """Mean NLL per scored token of one [P, B, L] batch (deterministic)."""
  return float(_nll_fn(model_config)(params, batch))


@dataclasses.dataclass(frozen=True)
class HeldOutStop:
  """Stop once the forget language's held-out NLL reaches a target.

  Attributes:
    batch: [P', B, L] device-ready features of the held-out rows.
    target_nll: stop after the first step at or above it (the reference
      model's NLL on the same rows, at most the uniform log V).
  """

  batch: Any
  target_nll: float
