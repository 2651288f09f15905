"""Adding and removing experts of sequence-gated MoE layers.

With `router='sequence_gate'` (`model.sequence_gates`) every expert owns
one gate row g_e and scores a token independently of the other experts,
s_e = sigmoid(g_e . h), h the mean activation of the token's sequence up to
and including it (causal; as in the expert-owned gates of Lifelong-MoE-style
and DEMix-style models, Gururangan et al. 2022). So an expert can be added
for a new language, or removed, without retraining the others. Routing is
per token: the tokens of one sequence can choose different experts, early
tokens (short prefixes) most of all.

  add       `add_expert` appends one expert (a gate row and expert weights)
            at the end of every partition's experts in every MoE layer.
            Training it alone (`new_expert_selection` as the train step's
            update mask) leaves every other parameter bit-identical, so a
            token computes exactly what it computed before if no token of
            its sequence at or before it reaches the new expert in any layer
            (its routing, attention and experts read nothing else); a whole
            sequence is unchanged if none of its tokens does. This holds
            provided no token is dropped (a token moving to the new expert
            frees capacity and can change another's drops): use a capacity
            of T (capacity factor E / K) or the dropless 'ragged' dispatch.
            The 'reference' loop is not bitwise stable across expert counts
            under the group vmap (XLA sums it in an E-dependent order, ~1e-6
            apart).
  remove    `remove_expert` deletes one expert per MoE layer; tokens that
            used it fall back to their next-best expert; a token is
            unchanged if no token of its sequence at or before it used it.

Training the new expert (`NewExpertObjective`, run by the one training loop)
minimizes the new language's token cross-entropy plus a one-vs-rest gate
loss: binary cross-entropy of the new gate's logit at every scored token
(the logit of that token's prefix mean) against "is this the new language",
over batches that also hold old-language sequences. The LM loss alone would
only reach the gate row through the tokens that already select the expert;
the gate loss makes the new gate a detector of its language from every
prefix length on, which is what keeps old tokens off the new expert.

Under tier 1 (P > 1) a new language belongs to some partitions ('owners');
every partition gets the new slot (experts per partition are uniform) and
`owner_expert_mask` keeps the others off it.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import losses
from tiered_routing.model import routing
from tiered_routing.model import routing_capture
from tiered_routing.model import sequence_gates
from tiered_routing.model import transformer
from tiered_routing.tier1 import layout


def _check_sequence_gates(config: decoder_config.DecoderConfig) -> None:
  if config.router != "sequence_gate" or not config.num_experts:
    raise ValueError(
        f"Experts can be added or removed only with router='sequence_gate' "
        f"(got router={config.router!r}, num_experts={config.num_experts}): "
        "other routers normalize scores over all experts."
    )


def resized_config(
    config: decoder_config.DecoderConfig, num_experts: int
) -> decoder_config.DecoderConfig:
  """`config` with `num_experts` experts per partition.

  The capacity factor is rescaled so that the per-expert capacity
  ceil(cf * T * K / E) of the capacity dispatches stays the same.
  """
  if num_experts < config.top_k:
    raise ValueError(
        f"num_experts={num_experts} is below top_k="
        f"{config.top_k}; remove fewer experts."
    )
  scale = num_experts / config.num_experts
  # Rounded so that adding then removing an expert gives back the original
  # config exactly (equal configs share compiled functions).
  return dataclasses.replace(
      config,
      num_experts=num_experts,
      capacity_factor=round(config.capacity_factor * scale, 12),
  )


def _per_layer_partition(values, config, name) -> np.ndarray:
  """Broadcasts an int or [M] or [M, P] array of expert ids to int [M, P]."""
  shape = (len(config.moe_layers), config.num_partitions)
  ids = np.asarray(values)
  if ids.ndim == 1:
    ids = ids[:, None]
  try:
    ids = np.broadcast_to(ids, shape)
  except ValueError:
    raise ValueError(
        f"{name} has shape {np.shape(values)}; expected an int, "
        f"[M={shape[0]}] or [M, P]={shape}."
    ) from None
  if (
      not np.issubdtype(ids.dtype, np.integer)
      or ((ids < 0) | (ids >= config.num_experts)).any()
  ):
    raise ValueError(
        f"{name}={values!r}; allowed: ints in " f"[0, {config.num_experts})."
    )
  return ids


def add_expert(
    params: Any,
    config: decoder_config.DecoderConfig,
    *,
    source_experts: Any = 0,
    gate_rows_MxPxD: Optional[Any] = None,
) -> tuple[Any, decoder_config.DecoderConfig]:
  """Appends one expert to every partition of every MoE layer.

  The new expert has index Ep (the old Ep experts keep theirs) and starts as
  a copy of a source expert's weights, as DEMix initializes a new domain
  expert from the closest existing one (Gururangan et al. 2022, Sec. 6).

  Args:
    params: unboxed parameters of `TieredDecoder(config)`.
    config: its config (router 'sequence_gate').
    source_experts: expert whose weights the new one copies: an int, or int
      [M] (per MoE layer) or [M, P].
    gate_rows_MxPxD: the new gate rows; None = zeros, i.e. score 0.5 for
      every token until trained.

  Returns:
    (new params, config with num_experts + 1).
  """
  _check_sequence_gates(config)
  source = _per_layer_partition(source_experts, config, "source_experts")
  p = config.num_partitions

  def append(names, info, x_PxE):
    if info.is_router:
      rows = (
          jnp.zeros((p,) + x_PxE.shape[2:], x_PxE.dtype)
          if gate_rows_MxPxD is None
          else jnp.asarray(gate_rows_MxPxD, x_PxE.dtype)[info.moe_layer]
      )
      # The router's own helper (per partition) checks the row's shape.
      return jax.vmap(
          lambda g, r: sequence_gates.add_expert_gate({"gates": g}, r)["gates"]
      )(x_PxE, rows)
    new = x_PxE[np.arange(p), source[info.moe_layer]]
    return jnp.concatenate([x_PxE, new[:, None]], axis=1)

  new_params = expert_params.map_experts(params, config, append)
  return new_params, resized_config(config, config.num_experts + 1)


def remove_expert(
    params: Any, config: decoder_config.DecoderConfig, experts: Any
) -> tuple[Any, decoder_config.DecoderConfig]:
  """Deletes one expert per MoE layer (the same index in every partition).

  Experts above the removed one shift down by one. The removed expert's gate
  row and weights are gone from the returned parameters.

  Args:
    params: unboxed parameters of `TieredDecoder(config)`.
    config: its config (router 'sequence_gate').
    experts: the expert to remove: an int, or int [M] (one per MoE layer).

  Returns:
    (new params, config with num_experts - 1).
  """
  _check_sequence_gates(config)
  ids = _per_layer_partition(experts, config, "experts")
  if (ids != ids[:, :1]).any():
    raise ValueError(
        "remove_expert removes the same index in every "
        f"partition; got {experts!r}."
    )
  ids = ids[:, 0]
  new_config = resized_config(config, config.num_experts - 1)

  def drop(names, info, x_PxE):
    e = int(ids[info.moe_layer])
    if info.is_router:
      return jax.vmap(
          lambda g: sequence_gates.remove_expert_gate({"gates": g}, e)["gates"]
      )(x_PxE)
    return jnp.concatenate([x_PxE[:, :e], x_PxE[:, e + 1 :]], axis=1)

  return expert_params.map_experts(params, config, drop), new_config


def new_expert_selection(
    config: decoder_config.DecoderConfig, owners: Sequence[int] = (0,)
) -> np.ndarray:
  """bool [M, P, Ep]: the last expert (the added one) of the owners."""
  owners = tuple(
      layout.checked_partitions("owners", owners, config.num_partitions)
  )
  selected = np.zeros(
      (len(config.moe_layers), config.num_partitions, config.num_experts), bool
  )
  selected[:, list(owners), -1] = True
  return selected


def owner_expert_mask(
    config: decoder_config.DecoderConfig, owners: Sequence[int] = (0,)
) -> Optional[np.ndarray]:
  """expert_mask_PxE keeping non-owner partitions off the added expert.

  Returns None when every partition owns it (no mask needed).
  """
  owners = tuple(
      layout.checked_partitions("owners", owners, config.num_partitions)
  )
  p, e = config.num_partitions, config.num_experts
  if set(owners) == set(range(p)):
    return None
  new_PxE = new_expert_selection(config, range(p))[0]
  mask_PxP = np.zeros((p, p), bool)  # Token partition x new slot's owner.
  mask_PxP[owners, owners] = True
  if config.sharing == "all":
    allowed = ~np.broadcast_to(new_PxE.reshape(1, p * e), (p, p * e)).copy()
    allowed[:, e - 1 :: e] |= mask_PxP
    return allowed
  return ~new_PxE | np.isin(np.arange(p), owners)[:, None]


def new_expert_ids(config: decoder_config.DecoderConfig) -> jax.Array:
  """int32 [P]: layer-level index of partition p's added (last) expert."""
  e = config.num_experts
  p = jnp.arange(config.num_partitions, dtype=jnp.int32)
  return p * e + e - 1 if config.sharing == "all" else jnp.full_like(p, e - 1)


def uses_expert(
    routing_: routing_capture.TokenRouting, expert_T: jax.Array
) -> jax.Array:
  """bool [T]: whether token t is sent to expert expert_T[t] in any layer."""
  hit = (routing_.expert_index_MxTxK == expert_T[None, :, None]) & (
      routing_.combine_weights_MxTxK != 0
  )
  return hit.any(axis=(0, 2))


def _router_logits(intermediates: Any) -> list[jax.Array]:
  """Each MoE layer's captured router logits, flattened to [T, E]."""
  out = []
  leaves = jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda x: isinstance(x, routing.RouterOutput)
  )[0]
  for path, leaf in leaves:
    if isinstance(leaf, routing.RouterOutput) and "__call__" in (
        expert_params.path_names(path)
    ):
      logits = leaf.router_logits_TxE
      out.append(logits.reshape(-1, logits.shape[-1]))
  return out


@dataclasses.dataclass(frozen=True)
class NewExpertConfig:
  """How the added expert is trained.

  Attributes:
    language_id: id (`languages.CODES` index) of the new language.
    gate_loss_weight: weight of the one-vs-rest gate loss.
  """

  language_id: int
  gate_loss_weight: float = 1.0

  def __post_init__(self):
    if not self.gate_loss_weight >= 0:
      raise ValueError(
          f"gate_loss_weight={self.gate_loss_weight!r} must be " ">= 0."
      )


def new_expert_loss(
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    model: transformer.TieredDecoder,
    config: NewExpertConfig,
    expert_mask_PxE: Optional[jax.Array] = None,
):
  """New-language cross-entropy + gate loss, and metrics.

  The gate loss and accuracy are per scored token, each on the new gate's
  logit for that token's prefix (its routing logit), averaged over tokens
  and MoE layers.

  Returns:
    (loss, {'lm_loss', 'gate_loss', 'gate_accuracy', 'new_expert_use',
    'old_expert_use', 'loss'}): the use fractions are over the new / old
    language's tokens that reach the added expert in some layer.
  """
  tokens = batch["decoder_input_tokens"]
  out = forward_lib.forward(
      model, params, batch, expert_mask_PxE=expert_mask_PxE,
      capture_routing=True,
  )
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  is_new = (batch["decoder_language_ids"] == config.language_id).astype(
      jnp.float32
  )
  ce_sum, new_weight, _ = losses.cross_entropy_loss(
      out.logits_PxBxLxV, batch["decoder_target_tokens"], weights * is_new
  )
  lm_loss = ce_sum / jnp.maximum(new_weight, 1.0)
  ids_T = new_expert_ids(model.config)[layout.token_partition_ids(tokens.shape)]
  w_T, new_T = weights.reshape(-1), is_new.reshape(-1)
  gate_terms, correct = [], []
  for logits_TxE in _router_logits(out.intermediates):
    z_T = jnp.take_along_axis(logits_TxE, ids_T[:, None], axis=1)[:, 0]
    gate_terms.append(optax.sigmoid_binary_cross_entropy(z_T, new_T))
    correct.append((z_T > 0) == (new_T > 0))
  norm = jnp.maximum(w_T.sum(), 1.0)
  gate_loss = jnp.mean(jnp.stack([(g * w_T).sum() / norm for g in gate_terms]))
  used_T = uses_expert(out.routing, ids_T).astype(jnp.float32)
  old_T = (1.0 - new_T) * w_T
  loss = lm_loss + config.gate_loss_weight * gate_loss
  metrics = {
      "loss": loss,
      "lm_loss": lm_loss,
      "gate_loss": gate_loss,
      "gate_accuracy": jnp.mean(
          jnp.stack([(c * w_T).sum() / norm for c in correct])
      ),
      "new_expert_use": (
          (used_T * new_T * w_T).sum() / jnp.maximum((new_T * w_T).sum(), 1.0)
      ),
      "old_expert_use": (used_T * old_T).sum() / jnp.maximum(old_T.sum(), 1.0),
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class NewExpertObjective:
  """`new_expert_loss` as the objective of `train.steps.train_step`.

  Train with the update mask of `new_expert_selection` (through
  `expert_params.trainable_mask(..., include_router=True)`), so that only
  the added expert moves.

  Attributes:
    model: the grown decoder.
    config: the new language and the gate loss weight.
    expert_mask_PxE: optional mask keeping non-owner partitions off the new
      expert (`owner_expert_mask`).
  """

  model: transformer.TieredDecoder
  config: NewExpertConfig
  expert_mask_PxE: Optional[np.ndarray] = None

  def gradients(self, params, batch, rng, inputs=None):
    del rng, inputs  # Deterministic; no fixed inputs besides the params.
    mask = None if self.expert_mask_PxE is None else jnp.asarray(
        self.expert_mask_PxE
    )
    grad_fn = jax.grad(
        functools.partial(
            new_expert_loss, model=self.model, config=self.config,
            expert_mask_PxE=mask,
        ),
        has_aux=True,
    )
    return grad_fn(params, batch)
