"""Per-token routing decisions of every MoE layer, captured from a forward pass.

The MoE layers only sow aggregate router metrics; expert attribution and
TRACE need each token's chosen experts. Flax's `capture_intermediates` records
the `RouterOutput` each router returns, with the group (and, for private
experts, partition) axes that `nn.vmap` adds in front:

  logits, state = model.apply(
      variables, tokens_PxBxL, mutable=['intermediates'],
      capture_intermediates=is_router_call)
  routing = token_routing(state['intermediates'])

Every MoE layer groups tokens by a plain row-major reshape of the
`[P, B/P, L]` batch (`moe.group_shape`), so flattening the captured leading
axes gives token t = the t-th token of `tokens_PxBxL.reshape(-1)`, for all
three sharing levels. The captured outputs share the 'intermediates'
collection with the sown router metrics; `losses` reads only the sown values,
so the collection can go to `losses.total_loss` as it is.
"""

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import routing

_ROUTER_TYPES = (
    routing.TokenTopKRouter,
    routing.ExpertChoiceRouter,
    routing.HashRouter,
    routing.SequenceGateRouter,
)


def is_router_call(module: nn.Module, method_name: str) -> bool:
  """`capture_intermediates` filter: the output of every router's __call__."""
  # The group vmap wraps the call in a function that Flax also captures (as
  # 'route_group'); only '__call__' is kept so every layer appears once.
  return isinstance(module, _ROUTER_TYPES) and method_name == "__call__"


@flax.struct.dataclass
class TokenRouting:
  """Routing of T tokens through L MoE layers.

  Attributes:
    expert_index_LxTxK: int32 expert chosen in each of K slots.
    combine_weights_LxTxK: float32 slot weights; 0 = slot unused (padding,
      masked or dropped by the router).
    layer_names: the MoE layers' module paths, e.g. 'decoder/layers_1/moe'.
  """

  expert_index_LxTxK: jax.Array
  combine_weights_LxTxK: jax.Array
  layer_names: tuple[str, ...] = flax.struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    return self.expert_index_LxTxK.shape[1]


def _natural_key(name: str):
  # 'layers_10' sorts after 'layers_2'.
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def token_routing(intermediates: Any) -> TokenRouting:
  """Collects the captured router outputs into a `TokenRouting`.

  Args:
    intermediates: the 'intermediates' collection of an `apply` with
      `capture_intermediates=is_router_call` (with or without the outer key).

  Returns:
    The layers' routing in natural layer order, tokens flattened row-major.

  Raises:
    ValueError: if nothing was captured or layers disagree on T or K.
  """
  found = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda x: isinstance(x, routing.RouterOutput)
  )[0]
  for path, leaf in leaves:
    if not isinstance(leaf, routing.RouterOutput):
      continue
    names = [_key_name(k) for k in path]
    if "__call__" not in names:
      continue
    layer = [
        n for n in names[: names.index("__call__")] if n != "intermediates"
    ]
    if layer and layer[-1] == "router":
      layer = layer[:-1]
    k = leaf.expert_index_TxK.shape[-1]
    found["/".join(layer)] = (
        leaf.expert_index_TxK.reshape(-1, k),
        leaf.combine_weights_TxK.reshape(-1, k),
    )
  if not found:
    raise ValueError(
        "No router outputs in the intermediates; apply the model "
        "with capture_intermediates=is_router_call and "
        "mutable=['intermediates']."
    )
  names = tuple(sorted(found, key=_natural_key))
  shapes = {n: found[n][0].shape for n in names}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"MoE layers routed different [T, K] shapes: {shapes}.")
  return TokenRouting(
      expert_index_LxTxK=jnp.stack([found[n][0] for n in names]),
      combine_weights_LxTxK=jnp.stack([found[n][1] for n in names]).astype(
          jnp.float32
      ),
      layer_names=names,
  )


def token_partition_ids(shape_PxBxL: tuple[int, int, int]) -> jax.Array:
  """int32[T]: the tier-1 partition of each token of a `[P, B/P, L]` batch."""
  if len(shape_PxBxL) != 3:
    raise ValueError(f"Expected a [P, B/P, L] shape, got {shape_PxBxL}.")
  p, b, l = shape_PxBxL
  return jnp.repeat(jnp.arange(p, dtype=jnp.int32), b * l)


def apply_with_routing(
    model: nn.Module, variables: Any, tokens_PxBxL, **kwargs
) -> tuple[jax.Array, TokenRouting, Any]:
  """Runs `model.apply` and also returns every token's routing.

  Returns:
    (model output, TokenRouting, the 'intermediates' collection: the sown
    router metrics, ready for `losses.total_loss`, plus the captured router
    outputs, which `losses` ignores).
  """
  out, state = model.apply(
      variables,
      tokens_PxBxL,
      capture_intermediates=is_router_call,
      mutable=["intermediates"],
      **kwargs,
  )
  intermediates = state["intermediates"]
  return out, token_routing(intermediates), intermediates
