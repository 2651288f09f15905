"""Training losses and router metrics, all in float32.

The router losses are read back from the values every `MoeFeedForward` sows
into the 'intermediates' collection (names in `moe.SOWN_NAMES`):
  load_balance_loss  Switch Transformer auxiliary loss (Fedus et al. 2021,
                     eq. 4), 1.0 at perfect balance.
  router_z_loss      ST-MoE router z-loss (Zoph et al. 2022, eq. 5).
Under a partition vmap each sown value has a leading partition axis; losses
are averaged over it and summed over layers. Only values at the exact place
`sow` puts them are read, so the same collection may also hold outputs
recorded by `capture_intermediates` (e.g. the routers' `RouterOutput`s, whose
fields are named like the losses) without counting anything twice.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from tiered_routing.tier1 import languages


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None,
    z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted token cross-entropy with optional output z-loss.

  The z-loss term `z_loss * logsumexp(logits)^2` keeps the softmax normalizer
  near 1 (Mesh TensorFlow / PaLM, Chowdhery et al. 2022, Sec. 5). Leave it 0
  for evaluation.

  Args:
    logits: [..., V] logits (any float dtype; computed in float32).
    targets: [...] int target ids.
    weights: [...] loss weights (0 for padding); None = all ones.
    z_loss: coefficient of the output z-loss.

  Returns:
    (loss_sum, weight_sum, per_token_loss): scalar float32 sums and the
    [...] float32 per-token loss already multiplied by `weights`.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits shape {logits.shape} does not match targets "
                     f"shape {targets.shape} (expected targets + [V]).")
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  elif weights.shape != targets.shape:
    raise ValueError(f"weights shape {weights.shape} does not match targets "
                     f"shape {targets.shape}.")
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  # logsumexp subtracts the max internally, so large logits do not overflow.
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  per_token = log_z - target_logit
  if z_loss:
    per_token = per_token + z_loss * jnp.square(log_z)
  per_token = per_token * weights
  return jnp.sum(per_token), jnp.sum(weights), per_token


def per_language_sums(
    per_token_loss: jax.Array, weights: jax.Array, language_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Sums of weighted per-token loss and of weights for each language id.

  Args:
    per_token_loss: [...] loss already multiplied by `weights`.
    weights: [...] loss weights (0 at padding).
    language_ids: [...] int ids in [0, NUM_LANGUAGES).

  Returns:
    (loss_sum_N, weight_sum_N), float32 [NUM_LANGUAGES]; the exact
    per-language mean loss is loss_sum_N / weight_sum_N.
  """
  n = languages.NUM_LANGUAGES
  ids = language_ids.reshape(-1).astype(jnp.int32)
  zeros = jnp.zeros((n,), jnp.float32)
  loss_sum = zeros.at[ids].add(per_token_loss.reshape(-1).astype(jnp.float32))
  weight_sum = zeros.at[ids].add(weights.reshape(-1).astype(jnp.float32))
  return loss_sum, weight_sum


def _sown_layer(path, name: str) -> Optional[str]:
  """The layer path if `path` is where `Module.sow` put a value `name`.

  `sow` appends to a tuple at '<module path>/<name>', so a sown leaf sits at
  exactly '<module path>/<name>/<i>': dict keys, then one tuple index. Values
  recorded by `capture_intermediates` sit under a method name instead: a
  captured `RouterOutput` puts its field `load_balance_loss` at
  '<router path>/__call__/0/load_balance_loss', which must not count again.
  """
  *scopes, index = path
  if not isinstance(index, jax.tree_util.SequenceKey) or not scopes:
    return None
  if not all(isinstance(k, jax.tree_util.DictKey) for k in scopes):
    return None
  names = [str(k.key) for k in scopes]
  if names[-1] != name:
    return None
  layer = names[:-1]
  if layer and layer[0] == "intermediates":
    layer = layer[1:]
  return "/".join(layer)


def _sown(intermediates: Any, name: str) -> list[tuple[str, jax.Array]]:
  """(layer path, value) for every value sown as `name`, in tree order.

  A module sows a tuple (one entry per call), so several entries under one
  layer path are all returned. Captured method outputs are ignored.
  """
  found = []
  leaves = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  for path, value in leaves:
    layer = _sown_layer(path, name)
    if layer is not None:
      found.append((layer, jnp.asarray(value, jnp.float32)))
  return found


def collect_router_losses(intermediates: Any) -> dict[str, jax.Array]:
  """Sums each router loss over MoE layers (averaged over partitions/groups).

  Args:
    intermediates: the 'intermediates' collection returned by `apply(...,
      mutable=['intermediates'])` (with or without the outer key; captured
      intermediates are ignored).

  Returns:
    {'load_balance_loss': scalar, 'router_z_loss': scalar}; zeros for a dense
    model.
  """
  out = {}
  for name in ("load_balance_loss", "router_z_loss"):
    values = [jnp.mean(v) for _, v in _sown(intermediates, name)]
    out[name] = sum(values, jnp.zeros((), jnp.float32))
  return out


def total_loss(
    logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array],
    intermediates: Any, *, load_balance_factor: float = 0.01,
    router_z_loss_factor: float = 0.001,
    z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean token cross-entropy plus weighted router losses.

  The defaults are the ST-MoE coefficients (load balance 1e-2, router z-loss
  1e-3; Zoph et al. 2022, Sec. 3.1 and Table 4).

  Returns:
    (loss, aux) where aux holds 'cross_entropy' (mean per weighted token),
    'weight_sum', 'load_balance_loss', 'router_z_loss' and 'loss'.
  """
  loss_sum, weight_sum, _ = cross_entropy_loss(logits, targets, weights,
                                               z_loss)
  ce = loss_sum / jnp.maximum(weight_sum, 1e-8)
  router = collect_router_losses(intermediates)
  loss = (ce + load_balance_factor * router["load_balance_loss"]
          + router_z_loss_factor * router["router_z_loss"])
  aux = dict(cross_entropy=ce, weight_sum=weight_sum, loss=loss, **router)
  return loss, aux


def router_metrics(intermediates: Any) -> dict[str, jax.Array]:
  """Routing statistics per MoE layer and averaged over layers.

  Returns:
    For every MoE layer path `<layer>` (e.g. 'decoder/layers_1/moe'):
    '<layer>/expert_usage_E' (fraction of routed slots per expert, averaged
    over partitions), '<layer>/dropped_fraction' and '<layer>/router_entropy'
    (normalized to [0, 1]); plus 'dropped_fraction' and 'router_entropy'
    averaged over layers. Empty for a dense model.
  """
  metrics = {}
  for name in ("dropped_fraction", "router_entropy"):
    per_layer = _sown(intermediates, name)
    for layer, value in per_layer:
      metrics[f"{layer}/{name}"] = jnp.mean(value)
    if per_layer:
      metrics[name] = jnp.mean(jnp.stack([jnp.mean(v) for _, v in per_layer]))
  for layer, usage in _sown(intermediates, "expert_usage_E"):
    metrics[f"{layer}/expert_usage_E"] = jnp.mean(
        usage.reshape(-1, usage.shape[-1]), axis=0)
  return metrics
