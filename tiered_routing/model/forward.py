"""The one forward pass: a `[P, B/P, L]` feature batch through `TieredDecoder`.

Every caller runs the model through `forward`: the train step, the
per-language evaluator, routed scoring, the unlearning objectives, ESFT,
expert gates, MoEfication and text generation. So how a batch becomes model
arguments is written once: which features feed which argument (tokens,
packing segment ids, positions), how a step's key splits into the dropout
and router-jitter streams, and how callers ask for

  * expert masks (`expert_mask_PxE` for every MoE layer, e.g. forced routing
    or tier 1 under sharing 'all'; `expert_mask_MxPxE` per MoE layer, e.g.
    unlearning by masking forget-critical experts; `expert_mask_MxPxBxLxE`
    per token, to replay another model's routing);
  * the sown intermediates (router losses and metrics, for training);
  * every token's routing (`routing_capture.TokenRouting`, for attribution,
    TRACE, analysis and expert gates).

A batch is a mapping with 'decoder_input_tokens' and optionally
'decoder_segment_ids' and 'decoder_positions' ([P, B/P, L] int arrays, the
features of `data.pipeline`); other features are ignored.
"""

from typing import Any, Mapping, Optional

import flax
import jax

from tiered_routing.model import routing_capture
from tiered_routing.model import transformer

INPUT_TOKENS = "decoder_input_tokens"
SEGMENT_IDS = "decoder_segment_ids"
POSITIONS = "decoder_positions"


@flax.struct.dataclass
class ForwardOutput:
  """What one forward pass returns.

  Attributes:
    logits_PxBxLxV: float32 next-token logits.
    intermediates: the 'intermediates' collection (sown router losses and
      metrics, and the captured router outputs with `capture_routing`); {}
      unless asked for.
    routing: every token's routing with `capture_routing`, else None.
  """

  logits_PxBxLxV: jax.Array
  intermediates: Any = None
  routing: Optional[routing_capture.TokenRouting] = None


def _rngs(rng: Optional[jax.Array]) -> Optional[dict[str, jax.Array]]:
  """A step key split into the dropout and router-jitter streams."""
  if rng is None:
    return None
  dropout_rng, jitter_rng = jax.random.split(rng)
  return {"dropout": dropout_rng, "jitter": jitter_rng}


def forward(
    model: transformer.TieredDecoder,
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    rng: Optional[jax.Array] = None,
    deterministic: bool = True,
    expert_mask_PxE: Optional[jax.Array] = None,
    expert_mask_MxPxE: Optional[jax.Array] = None,
    expert_mask_MxPxBxLxE: Optional[jax.Array] = None,
    keep_intermediates: bool = False,
    capture_routing: bool = False,
) -> ForwardOutput:
  """Runs `model` on one `[P, B/P, L]` batch.

  Args:
    model: the decoder.
    params: its parameters (the 'params' collection).
    batch: features, see the module doc.
    rng: the step's key (dropout, router jitter); None = no randomness.
    deterministic: disables dropout and router jitter.
    expert_mask_PxE: bool [P, E], True = allowed, in every MoE layer.
    expert_mask_MxPxE: bool [M, P, E], one mask per MoE layer.
    expert_mask_MxPxBxLxE: bool, one mask per MoE layer and token (routing
      replay, `routing_capture.replay_mask`).
    keep_intermediates: also return the sown intermediates.
    capture_routing: also return every token's routing (implies the
      intermediates, which then also hold the captured router outputs;
      `losses` reads only the sown values).

  Returns:
    The logits and what was asked for.
  """
  kwargs = dict(
      segment_ids_PxBxL=batch.get(SEGMENT_IDS),
      positions_PxBxL=batch.get(POSITIONS),
      expert_mask_PxE=expert_mask_PxE,
      expert_mask_MxPxE=expert_mask_MxPxE,
      expert_mask_MxPxBxLxE=expert_mask_MxPxBxLxE,
      deterministic=deterministic,
      rngs=_rngs(rng),
  )
  variables = {"params": params}
  tokens = batch[INPUT_TOKENS]
  if not (keep_intermediates or capture_routing):
    return ForwardOutput(model.apply(variables, tokens, **kwargs))
  capture = routing_capture.is_router_call if capture_routing else False
  logits, state = model.apply(
      variables,
      tokens,
      mutable=["intermediates"],
      capture_intermediates=capture,
      **kwargs,
  )
  intermediates = state.get("intermediates", {})
  routing = (
      routing_capture.token_routing(intermediates) if capture_routing else None
  )
  return ForwardOutput(logits, intermediates, routing)
