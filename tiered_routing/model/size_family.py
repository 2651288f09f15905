"""Models with n partitions and the total parameters of one n = 1 model.

The research plan compares numbers of partitions n at equal *total*
parameters (gin/models/n*.gin do it by hand at full size). Given the n = 1
member, `member` builds the one with n partitions and a sharing level:

  'attention', 'all'  shared embeddings and attention at the n = 1 width;
                      each partition gets E / n of the n = 1 experts
                      unchanged and, under 'attention' (whose dense FFNs
                      are private, DEMix-style), 1 / n of the dense FFN
                      width; so the total is n = 1's exactly (routers
                      included: P routers over E / P experts each).
  'none'              n private models. Every partition repeats the
                      embedding and attention, so they must be narrower:
                      d_model is the widest multiple of the head width for
                      which the expert width that restores n = 1's total
                      is at least n = 1's expert width (experts never
                      become narrower than at n = 1); that expert width is
                      then solved for, and the total must land within
                      `tolerance` of n = 1's.

Experts per partition are E / n throughout, so every n routes over the
same number of experts in all.
"""

import dataclasses
import functools

from tiered_routing.model import decoder_config
from tiered_routing.model import param_count


@functools.lru_cache(maxsize=None)
def total_params(config: decoder_config.DecoderConfig) -> int:
  return param_count.count_params(config).total


def _with_width(base, n, sharing, d_model, expert_d_ff):
  if sharing == "attention":
    d_ff = base.d_ff // n  # Private dense FFNs split the base's units.
  else:
    d_ff = round(base.d_ff * d_model / base.d_model)
  return dataclasses.replace(
      base,
      num_partitions=n,
      sharing=sharing,
      d_model=d_model,
      num_heads=max(1, d_model // base.head_dim),
      d_ff=max(1, d_ff),
      num_experts=base.num_experts // n,
      expert_d_ff=expert_d_ff,
  )


def _solve_expert_width(base, n, d_model, target) -> int:
  """The expert_d_ff whose total is closest to `target` (totals are linear
  in expert_d_ff), or 0 if none >= 1 comes near it."""
  at_1 = total_params(_with_width(base, n, "none", d_model, 1))
  at_2 = total_params(_with_width(base, n, "none", d_model, 2))
  slope = at_2 - at_1
  if slope <= 0:
    return 0
  return max(0, round(1 + (target - at_1) / slope))


def _check_base(base: decoder_config.DecoderConfig, n: int) -> None:
  if base.num_partitions != 1:
    raise ValueError(
        f"The family's base must have num_partitions=1, got "
        f"{base.num_partitions}."
    )
  if not base.num_experts or base.num_experts % n:
    raise ValueError(
        f"num_partitions={n} must divide the base's num_experts="
        f"{base.num_experts}."
    )
  if base.num_experts // n < base.top_k:
    raise ValueError(
        f"num_partitions={n} leaves {base.num_experts // n} experts per "
        f"partition; allowed: at least top_k={base.top_k}."
    )
  if base.d_model % base.head_dim:
    raise ValueError(
        f"The base's d_model={base.d_model} must be a multiple of its "
        f"head_dim={base.head_dim} (widths step by heads)."
    )


def member(
    base: decoder_config.DecoderConfig,
    num_partitions: int,
    sharing: str,
    tolerance: float = 0.05,
) -> decoder_config.DecoderConfig:
  """The family member with `num_partitions` partitions and `sharing`.

  Args:
    base: the n = 1 member (num_partitions 1, a MoE).
    num_partitions: n; must divide base.num_experts into groups of at
      least top_k.
    sharing: 'none', 'attention' or 'all'.
    tolerance: allowed relative difference of the total from base's.

  Returns:
    The config; its total is within `tolerance` of base's.

  Raises:
    ValueError: for a bad base or n, or when no width meets the total.
  """
  _check_base(base, num_partitions)
  if sharing not in decoder_config.SHARING_LEVELS:
    raise ValueError(
        f"sharing={sharing!r}; allowed: {decoder_config.SHARING_LEVELS}"
    )
  target = total_params(base)
  if num_partitions == 1 or sharing != "none":
    config = _with_width(
        base, num_partitions, sharing, base.d_model, base.expert_d_ff
    )
  else:
    config = None
    for d_model in range(base.d_model, 0, -base.head_dim):
      width = _solve_expert_width(base, num_partitions, d_model, target)
      if width >= base.expert_d_ff:
        config = _with_width(base, num_partitions, "none", d_model, width)
        break
  error = (
      abs(total_params(config) - target) / target if config else float("inf")
  )
  if error > tolerance:
    raise ValueError(
        f"No member with num_partitions={num_partitions}, sharing="
        f"{sharing!r} has the base's {target:,} parameters within "
        f"{tolerance:.0%}; allowed: a base whose experts hold more of its "
        "parameters (more or wider experts)."
    )
  return config
