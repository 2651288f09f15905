"""Per-token routing decisions of every MoE layer, captured from a forward pass.

The MoE layers only sow aggregate router metrics; expert attribution, TRACE,
routing analysis and expert gates need each token's chosen experts. Flax's
`capture_intermediates` records the `RouterOutput` each router returns, with
the group (and, for private experts, partition) axes that `nn.vmap` adds in
front; `forward.forward(..., capture_routing=True)` asks for it and
`token_routing` collects it into a `TokenRouting`.

Every MoE layer groups tokens by a plain row-major reshape of the
`[P, B/P, L]` batch (`moe.group_shape`), so flattening the captured leading
axes gives token t = the t-th token of `tokens_PxBxL.reshape(-1)`, for all
three sharing levels (`tier1.layout.token_partition_ids` gives each token's
partition). The captured outputs share the 'intermediates' collection with
the sown router metrics; `losses` reads only the sown values.
"""

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tiered_routing.model import router_registry
from tiered_routing.model import routing

def is_router_call(module: nn.Module, method_name: str) -> bool:
  """`capture_intermediates` filter: the output of every router's __call__."""
  # The group vmap wraps the call in a function that Flax also captures (as
  # 'route_group'); only '__call__' is kept so every layer appears once.
  return router_registry.is_router(module) and method_name == "__call__"


@flax.struct.dataclass
class TokenRouting:
  """Routing of T tokens through M MoE layers.

  Attributes:
    expert_index_MxTxK: int32 expert chosen in each of K slots.
    combine_weights_MxTxK: float32 slot weights; 0 = slot unused (padding,
      masked or dropped by the router).
    layer_names: the MoE layers' module paths, e.g. 'decoder/layers_1/moe'.
  """

  expert_index_MxTxK: jax.Array
  combine_weights_MxTxK: jax.Array
  layer_names: tuple[str, ...] = flax.struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    return self.expert_index_MxTxK.shape[1]


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
      expert_index_MxTxK=jnp.stack([found[n][0] for n in names]),
      combine_weights_MxTxK=jnp.stack([found[n][1] for n in names]).astype(
          jnp.float32
      ),
      layer_names=names,
  )


def replay_mask(
    routing: TokenRouting, batch_shape: tuple[int, int, int], num_experts: int
) -> jax.Array:
  """A per-token expert mask that replays `routing` in another model.

  Each token may use only the experts it used (non-zero combine weight)
  in the captured routing, so a top-k router given the mask picks exactly
  them again; its own gates still weigh them. Tokens that used no expert
  (padding, or every slot dropped) are left free.

  Args:
    routing: the captured routing of a `[P, B/P, L]` batch.
    batch_shape: (P, B/P, L).
    num_experts: experts per MoE layer (`config.experts_per_layer`).

  Returns:
    bool [M, P, B/P, L, E] for `forward.forward(expert_mask_MxPxBxLxE=...)`.
  """
  used_MxTxK = routing.combine_weights_MxTxK != 0
  one_hot = jax.nn.one_hot(routing.expert_index_MxTxK, num_experts, dtype=bool)
  chosen_MxTxE = jnp.any(one_hot & used_MxTxK[..., None], axis=2)
  free_MxTx1 = ~jnp.any(chosen_MxTxE, axis=-1, keepdims=True)
  mask_MxTxE = chosen_MxTxE | free_MxTx1
  return mask_MxTxE.reshape((routing.expert_index_MxTxK.shape[0],)
                            + tuple(batch_shape) + (num_experts,))
