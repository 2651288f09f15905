"""Parameter counts of a `DecoderConfig`: total and active per token.

Shapes come from `jax.eval_shape` of the model's `init`, so nothing is
allocated and full-size configs are counted in seconds. The research plan
holds the total constant across the number of partitions n; the size
configs (gin/models/n*.gin) are checked against these counts. The binary is
`python -m tiered_routing.cli.count_params`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import decoder_config
from tiered_routing.model import transformer

# Leaf-path substrings that name each parameter category (first match wins).
_CATEGORIES = (("expert", "experts"), ("router", "routers"),
               ("token_embed", "embedding"), ("logits_kernel", "embedding"),
               ("norm", "norms"), ("attention", "attention"),
               ("mlp", "dense_ffn"))


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts.

  Attributes:
    total: every parameter of the model, all partitions.
    active: parameters one token touches: all non-expert parameters of its
      partition plus k/E of that partition's expert parameters (k = top_k, or
      capacity_factor for expert choice, its mean experts per token). A token
      lives in exactly one partition, so this is also per partition.
    per_partition_total: parameters one partition's model consists of (its
      private parameters plus everything shared).
    per_partition_active: equal to `active` (see above); kept so per-partition
      columns of a table read alike.
    expert: expert parameters, all partitions.
  """

  total: int
  active: int
  per_partition_total: int
  per_partition_active: int
  expert: int


def param_shapes(config: decoder_config.DecoderConfig):
  """Abstract (shape-only) parameters of `TieredDecoder(config)`, boxed."""
  tokens = jnp.zeros((config.num_partitions, 1, 1), jnp.int32)
  init = lambda: transformer.TieredDecoder(config).init(
      jax.random.PRNGKey(0), tokens)
  return jax.eval_shape(init)["params"]


def _leaves(config):
  """(path string, size, is_private, is_expert) for every parameter."""
  boxed = param_shapes(config)
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  out = []
  for path, leaf in flat:
    names = [str(getattr(k, "key", k)) for k in path]
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    axes = leaf.names if isinstance(leaf, nn.Partitioned) else ()
    size = 1
    for dim in value.shape:
      size *= dim
    out.append(("/".join(names), size, "partition" in axes, "expert" in names))
  return out


def count_params(config: decoder_config.DecoderConfig) -> ParamCount:
  """Counts total and active parameters without allocating them."""
  p = config.num_partitions
  total = expert = one_partition = one_partition_expert = 0
  for _, size, private, is_expert in _leaves(config):
    total += size
    share = size // p if private else size
    one_partition += share
    if is_expert:
      expert += size
      one_partition_expert += share
  if config.router == "expert_choice":
    per_token = config.capacity_factor
  else:
    per_token = config.top_k
  experts = config.experts_per_layer
  active = one_partition - one_partition_expert + round(
      one_partition_expert * min(per_token, experts) / max(experts, 1))
  return ParamCount(total=total, active=active,
                    per_partition_total=one_partition,
                    per_partition_active=active, expert=expert)


def param_breakdown(config: decoder_config.DecoderConfig) -> dict[str, int]:
  """Total parameters per category (embedding, attention, experts, ...)."""
  out = {}
  for path, size, _, _ in _leaves(config):
    category = next((c for key, c in _CATEGORIES if key in path), "other")
    out[category] = out.get(category, 0) + size
  return out


def format_table(config: decoder_config.DecoderConfig) -> str:
  """A human-readable table of `count_params` and `param_breakdown`."""
  count = count_params(config)
  rows = [("partitions", config.num_partitions),
          ("sharing", config.sharing),
          ("d_model", config.d_model),
          ("layers", config.num_layers),
          ("experts per MoE layer", config.experts_per_layer),
          ("experts per partition", config.num_experts),
          ("expert d_ff", config.expert_d_ff),
          ("total", count.total),
          ("per partition total", count.per_partition_total),
          ("active per token", count.active),
          ("expert (all partitions)", count.expert)]
  rows += [(f"  {k}", v) for k, v in sorted(param_breakdown(config).items())]
  lines = []
  for name, value in rows:
    if isinstance(value, int) and value >= 10_000:
      value = f"{value:>15,d}  ({value / 1e6:,.1f}M)"
    lines.append(f"{name:<26}{value}")
  return "\n".join(lines)
