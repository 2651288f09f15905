"""Expert-specialized fine-tuning (ESFT) and low-rank adapters on routers.

ESFT (Wang et al. 2024, "Let the Expert Stick to His Last") fine-tunes a MoE
model on a task by training only the experts the task's tokens use most:

  1. Route the task data through the model and score every expert of every
     MoE layer (`collect_routing`, `expert_relevance`): ESFT-Token is the
     token selection ratio (share of the task's tokens sent to the expert),
     ESFT-Gate the mean gate weight the expert gets per token.
  2. Per layer, take experts in decreasing relevance until their relevance
     adds up to a share p of the layer's total (`select_experts`).
  3. Train those experts only; routers, attention, embeddings, dense layers
     and all other experts stay frozen (`trainable_mask`, applied as the
     step's update mask, element-wise, since the chosen experts are slices
     of stacked [E, D, F] tensors that name-based freezing cannot
     separate).

Two variants: forced routing (`forced_routing_mask`: the task's tokens may
use the chosen experts only) and LoRA on the routers (`init_router_lora`:
kernel + A @ B * alpha / r with B = 0 at init, Hu et al. 2022; only A and B
train), which re-routes tokens without touching any expert. Both train with
the one step (`train.steps.train_step`) on the LM objective: forced routing
as its fixed expert mask, LoRA as its `params_view` (`lora_view` merges the
adapters into the router kernels before every forward pass), so the model
code needs no change; the chosen experts are trained through the step's
update mask.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.eval import language_eval
from tiered_routing.eval import routing_counts
from tiered_routing.model import decoder_config
from tiered_routing.model import expert_params
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import layout

RELEVANCE = ("token", "gate")
LORA_TARGETS = ("kernel", "gates")  # Token-choice kernels, sequence gates.


def collect_routing(
    config: decoder_config.DecoderConfig,
    params: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    expert_mask_MxPxE: Optional[np.ndarray] = None,
) -> routing_counts.RoutingCounts:
  """Per-language expert use of every MoE layer over `batches`.

  Args:
    config: the model's config.
    params: its parameters.
    batches: [P, B/P, L] feature batches (`decoder_input_tokens`,
      `decoder_language_ids`, `decoder_loss_weights`, optionally segment ids
      and positions).
    expert_mask_MxPxE: optional expert mask (e.g. forced routing).

  Returns:
    `RoutingCounts` with one row per language and one column per expert of a
    MoE layer as the router numbers it (P * Ep under sharing 'all'); only
    scored tokens count.
  """
  p = config.num_partitions
  batches = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
  blocks = [
      [{k: v[q] for k, v in b.items()} for b in batches] for q in range(p)
  ]
  evaluator = language_eval.LanguageEvaluator(
      config, blocks, vocabulary=None, partitions_alone=False
  )
  routing = evaluator.evaluate(
      params, expert_mask_MxPxE=expert_mask_MxPxE, capture_routing=True
  ).routing
  if config.sharing == "all":
    return routing
  # Private experts: fold the global ids q * Ep + e back onto e.
  out = routing_counts.RoutingCounts(
      len(config.moe_layers), config.num_experts, routing.shape[0]
  )
  fold = lambda a: a.reshape(a.shape[:2] + (p, -1)).sum(axis=2)
  out.assignments_NxMxE = fold(routing.assignments_NxMxE)
  out.mass_NxMxE = fold(routing.mass_NxMxE)
  out.tokens_NxM = routing.tokens_NxM
  return out


def expert_relevance(
    counts: routing_counts.RoutingCounts,
    codes: Sequence[str],
    score: str = "token",
) -> np.ndarray:
  """float64 [M, E]: relevance of each expert to the languages `codes`.

  'token' = ESFT-Token (routed slots / tokens), 'gate' = ESFT-Gate (summed
  combine weights / tokens), both pooled over the given languages.
  """
  if score not in RELEVANCE:
    raise ValueError(f"score={score!r} is invalid; allowed: {RELEVANCE}.")
  rows = [languages.language_id(c) for c in codes]
  source = counts.assignments_NxMxE if score == "token" else counts.mass_NxMxE
  tokens_M = counts.tokens_NxM[rows].sum(axis=0)
  if not (tokens_M > 0).all():
    raise ValueError(
        f"No routed tokens of {list(codes)} in some MoE layer; "
        "collect routing on their data first."
    )
  return source[rows].sum(axis=0) / tokens_M[:, None]


def select_experts(relevance_MxE, coverage: float) -> np.ndarray:
  """bool [M, E]: per layer, the most relevant experts until they cover p.

  Experts are taken in decreasing relevance (ties: lower index first) while
  the relevance already taken is below `coverage` of the layer's total
  (ESFT's threshold p), so at least one expert per layer is chosen.
  """
  relevance = np.asarray(relevance_MxE, np.float64)
  if relevance.ndim != 2 or (relevance < 0).any():
    raise ValueError(
        f"relevance must be a non-negative [M, E] array; got "
        f"shape {relevance.shape}."
    )
  if not 0 < coverage <= 1:
    raise ValueError(f"coverage={coverage!r}; allowed: (0, 1].")
  order = np.argsort(-relevance, axis=-1, kind="stable")
  share = np.take_along_axis(relevance, order, -1) / np.maximum(
      relevance.sum(-1, keepdims=True), 1e-30
  )
  before = np.cumsum(share, axis=-1) - share
  take = before < coverage - 1e-12
  take[:, 0] = True
  selected = np.zeros(relevance.shape, bool)
  np.put_along_axis(selected, order, take, axis=-1)
  return selected


def to_selection(
    selected_MxE,
    config: decoder_config.DecoderConfig,
    partitions: Sequence[int],
) -> np.ndarray:
  """bool [M, P, Ep] (see `expert_params`) from a layer-level [M, E] choice.

  Args:
    selected_MxE: experts of a MoE layer as the router numbers them (E =
      `config.experts_per_layer`).
    config: the model's config.
    partitions: the partitions whose private experts are meant (those that
      see the task's data); ignored under sharing 'all', where the layer's
      experts are already global.
  """
  selected = np.asarray(selected_MxE, bool)
  m, p, e = len(config.moe_layers), config.num_partitions, config.num_experts
  if selected.shape != (m, config.experts_per_layer):
    raise ValueError(
        f"selected_MxE has shape {selected.shape}; expected "
        f"{(m, config.experts_per_layer)}."
    )
  if config.sharing == "all":
    return selected.reshape(m, p, e)
  out = np.zeros((m, p, e), bool)
  out[:, layout.checked_partitions("partitions", partitions, p)] = selected[
      :, None
  ]
  return out


def forced_routing_mask(
    selected_MxE,
    config: decoder_config.DecoderConfig,
    partitions: Sequence[int],
) -> np.ndarray:
  """expert_mask_MxPxE sending `partitions`' tokens to chosen experts only.

  Rows of other partitions allow every expert.
  """
  selected = np.asarray(selected_MxE, bool)
  m, e = len(config.moe_layers), config.experts_per_layer
  if selected.shape != (m, e) or not selected.any(-1).all():
    raise ValueError(
        f"selected_MxE must be bool {(m, e)} with at least one "
        f"expert per layer; got shape {selected.shape}."
    )
  mask = np.ones((m, config.num_partitions, e), bool)
  parts = layout.checked_partitions(
      "partitions", partitions, config.num_partitions
  )
  mask[:, parts] = selected[:, None]
  return mask


def trainable_mask(
    params: Any, config: decoder_config.DecoderConfig, selected_MxPxE
) -> Any:
  """ESFT: only the selected experts train (routers frozen)."""
  return expert_params.trainable_mask(params, config, selected_MxPxE)


# ----------------------------------------------------------------- router LoRA


def _router_leaves(params: Any, config) -> dict[tuple, jax.Array]:
  leaves = expert_params.expert_leaves(params, config)
  flat = dict(
      (expert_params.path_names(p), x)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  return {
      names: flat[names]
      for names, info in leaves.items()
      if info.is_router and names[-1] in LORA_TARGETS
  }


def _set_path(tree: dict, names: tuple, value) -> None:
  for name in names[:-1]:
    tree = tree.setdefault(name, {})
  tree[names[-1]] = value


def init_router_lora(
    params: Any, config: decoder_config.DecoderConfig, rank: int, rng: jax.Array
) -> dict:
  """LoRA adapters for every router: {path...: {'lora_a', 'lora_b'}}.

  For a router kernel [..., D, E] (gates [..., E, D]): lora_a [..., D, r]
  ~ N(0, 1/D) and lora_b [..., r, E] = 0, so the adapted model starts equal
  to the base model (Hu et al. 2022). The tree mirrors the parameter paths.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank={rank!r}; allowed: an int >= 1.")
  targets = _router_leaves(params, config)
  if not targets:
    raise ValueError("The model has no router kernels to adapt.")
  lora = {}
  for i, (names, kernel) in enumerate(sorted(targets.items())):
    if names[-1] == "gates":
      kernel = jnp.swapaxes(kernel, -1, -2)
    *batch, d, e = kernel.shape
    a = (
        jax.random.normal(
            jax.random.fold_in(rng, i), (*batch, d, rank), jnp.float32
        )
        * d**-0.5
    )
    _set_path(
        lora,
        names,
        {"lora_a": a, "lora_b": jnp.zeros((*batch, rank, e), jnp.float32)},
    )
  return lora


def merge_router_lora(
    params: Any, lora: Mapping[str, Any], alpha: float
) -> Any:
  """params with every adapted router kernel replaced by W + A B alpha / r."""

  def merge(path, x):
    names, node = expert_params.path_names(path), lora
    for name in names:
      if not isinstance(node, Mapping) or name not in node:
        return x
      node = node[name]
    a, b = node["lora_a"], node["lora_b"]
    delta = jnp.einsum("...dr,...re->...de", a, b) * (alpha / a.shape[-1])
    if names[-1] == "gates":
      delta = jnp.swapaxes(delta, -1, -2)
    return x + delta.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(merge, params)


def lora_param_count(config: decoder_config.DecoderConfig, rank: int) -> int:
  """Adapter parameter count: rank * (D + E) per router (and partition)."""
  copies = 1 if config.sharing == "all" else config.num_partitions
  return (
      len(config.moe_layers)
      * copies
      * rank
      * (config.d_model + config.experts_per_layer)
  )


def lora_view(alpha: float):
  """`params_view` of {'base': model params, 'lora': adapters}: the model's
  parameters with the adapters merged (for `train.steps.LmObjective` and
  evaluation)."""

  def view(params):
    return merge_router_lora(params["base"], params["lora"], alpha)

  return view


def lora_trainable_mask(params: Mapping[str, Any]) -> dict:
  """For {'base', 'lora'} parameters: only the adapters train."""
  return {
      "base": jax.tree.map(lambda _: np.asarray(False), params["base"]),
      "lora": jax.tree.map(lambda _: np.asarray(True), params["lora"]),
  }
