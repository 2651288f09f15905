"""MoEfication (`moefication`) of every dense FFN of a `TieredDecoder`.

  config = moefication.MoeficationConfig(num_experts=8)
  params = moefy_params(params, config)
  params = fit_routers(params, collect_mlp_inputs(model, params, batches), 8)
  with moefied(num_experts=8, top_k=2, routing='learned'):
    out = forward.forward(model, params, batch)  # Trace inside.

The converted model runs inside the unchanged decoder: `moefied` intercepts
every dense `layers.Mlp` call (`nn.intercept_methods`) and computes the top-k
expert mixture from the module's own permuted parameters, and the learned
routers are extra parameters stored next to them (`moefication_router`), so
under partition vmaps every partition sees its own slice. The evaluation
computes every expert and masks (it measures quality, not speed); a fast path
would dispatch the [E, D, F/E] experts with `dispatch.moe_mlp`, which needs a
router whose combine weights are 1 (the model's routers normalize them).
"""

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.model import expert_params
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import layers
from tiered_routing.related import moefication

ROUTINGS = ("oracle", "learned")
ROUTER_NAME = "moefication_router"  # Extra params next to a converted Mlp.
MLP_NAME = "mlp"  # Dense FFNs of decoder blocks (not MoE 'shared_mlp').
_INPUT_FEATURES = (
    "decoder_input_tokens",
    "decoder_segment_ids",
    "decoder_positions",
)


def _is_dense_mlp(names: tuple[str, ...]) -> bool:
  return len(names) >= 2 and names[-2] == MLP_NAME and names[-1] == "wi"


def _map_dense_mlps(params: Any, fn) -> Any:
  """Replaces every dense FFN dict `mlp` of params by fn(names, mlp)."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for key, value in params.items():
    if key == MLP_NAME and isinstance(value, Mapping) and "wi" in value:
      out[key] = fn(value)
    else:
      out[key] = _map_dense_mlps(value, fn)
  return out


def _per_slice(mlp: Mapping[str, Any], fn) -> dict:
  """Applies fn to each [D, F] slice of FFN params with leading axes."""
  lead = np.shape(mlp["wi"])[:-2]
  slices = [
      fn({k: np.asarray(v)[idx] for k, v in mlp.items()})
      for idx in np.ndindex(*lead)
  ]
  return jax.tree.map(
      lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *slices
  )


def moefy_params(params: Any, config: moefication.MoeficationConfig) -> Any:
  """Clusters and permutes every dense FFN (per partition if private)."""
  if not any(
      _is_dense_mlp(expert_params.path_names(p))
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ):
    raise ValueError("No dense FFN ('mlp' with 'wi') in params.")
  return _map_dense_mlps(
      params,
      lambda mlp: _per_slice(
          mlp, lambda s: moefication.moefy_mlp(s, config)[0]
      ),
  )


def _is_mlp_call(context) -> bool:
  return (
      isinstance(context.module, layers.Mlp)
      and context.module.name == MLP_NAME
      and context.method_name == "__call__"
  )


@contextlib.contextmanager
def moefied(
    num_experts: int,
    top_k: int,
    *,
    routing: str = "oracle",
    score: str = "positive",
):
  """Inside: every dense decoder FFN computes its top-k expert mixture.

  Use around tracing (e.g. inside a jitted function) of a model whose
  parameters went through `moefy_params` (and `fit_routers` for 'learned').
  """
  if routing not in ROUTINGS:
    raise ValueError(f"routing={routing!r} is invalid; allowed: {ROUTINGS}.")

  def interceptor(next_fun, args, kwargs, context):
    if not _is_mlp_call(context):
      return next_fun(*args, **kwargs)
    module, x = context.module, args[0]
    mlp = module.variables["params"]
    router = None
    if routing == "learned":
      if ROUTER_NAME not in mlp:
        raise ValueError(
            f"{module.path}: no '{ROUTER_NAME}'; fit_routers " "first."
        )
      router = mlp[ROUTER_NAME]
    experts = moefication.split_experts(
        {k: v for k, v in mlp.items() if k != ROUTER_NAME}, num_experts
    )
    y = moefication.moe_ffn(
        x.reshape(-1, x.shape[-1]),
        experts,
        top_k,
        activation=module.activation,
        score=score,
        router=router,
    )
    return y.reshape(x.shape).astype(module.dtype)

  with nn.intercept_methods(interceptor):
    yield


def collect_mlp_inputs(
    model: nn.Module, params: Any, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict:
  """Inputs of every dense FFN on the scored tokens of `batches`.

  Args:
    model: a dense `TieredDecoder`.
    params: its parameters.
    batches: [P, B/P, L] feature batches (`decoder_input_tokens`,
      `decoder_loss_weights`, and for packed rows `decoder_segment_ids` and
      `decoder_positions`).

  Returns:
    {FFN path: float32 [..., T, D]}, leading axes as the FFN's parameters'
    (partition-private FFNs keep their partitions apart).
  """

  def interceptor(next_fun, args, kwargs, context):
    if _is_mlp_call(context):
      context.module.sow("intermediates", "moefication_input", args[0])
    return next_fun(*args, **kwargs)

  @jax.jit
  def run(params, inputs):
    with nn.intercept_methods(interceptor):
      out = forward_lib.forward(model, params, inputs, keep_intermediates=True)
    return out.intermediates

  found: dict[tuple, list] = {}
  for batch in batches:
    # Packed rows need their segment ids and positions: without them
    # attention would mix the packed sequences and the inputs the routers
    # are fitted on would not be the ones they see at evaluation.
    inputs = {k: jnp.asarray(batch[k]) for k in _INPUT_FEATURES if k in batch}
    sown = run(params, inputs)
    valid = np.asarray(batch["decoder_loss_weights"]) > 0
    for path, x in jax.tree_util.tree_flatten_with_path(sown)[0]:
      names = expert_params.path_names(path)
      key = names[: names.index("moefication_input")]
      x = np.asarray(x)
      lead = x.shape[:-3] if x.ndim == valid.ndim + 1 else ()
      keep = valid.reshape(lead + (-1,))
      flat = x.reshape(lead + (-1, x.shape[-1]))
      found.setdefault(key, []).append((flat, keep))
  return {k: _stack_valid(v) for k, v in found.items()}


def _stack_valid(chunks) -> np.ndarray:
  """Concatenates the valid tokens of each chunk along T, per leading index."""
  lead = chunks[0][0].shape[:-2]
  per = [
      np.concatenate([x[idx][keep[idx]] for x, keep in chunks])
      for idx in np.ndindex(*lead)
  ]
  size = min(len(p) for p in per)  # Same T for every partition.
  return np.stack([p[:size] for p in per]).reshape(
      lead + (size, chunks[0][0].shape[-1])
  )


def fit_routers(
    params: Any,
    inputs: Mapping[tuple, np.ndarray],
    num_experts: int,
    *,
    activation: str = "gelu",
    score: str = "positive",
    l2: float = 1e-3,
) -> Any:
  """Adds a learned router next to every converted FFN in `inputs`.

  Each router is fitted to the oracle scores of its FFN (per partition for
  private FFNs) on the inputs from `collect_mlp_inputs`, and stored as
  `<ffn path>/moefication_router/{kernel, bias}`.
  """

  def fit(mlp, x):
    experts = moefication.split_experts(mlp, num_experts)
    targets = moefication.partition_scores(
        moefication.expert_hidden(jnp.asarray(x), experts, activation), score
    )
    return moefication.fit_router(x, np.asarray(targets), l2)

  def visit(tree, prefix):
    if not isinstance(tree, Mapping):
      return tree
    if prefix in inputs:
      x = inputs[prefix]
      mlp = {k: v for k, v in tree.items() if k != ROUTER_NAME}
      lead = np.shape(mlp["wi"])[:-2]
      fits = [
          fit({k: np.asarray(v)[i] for k, v in mlp.items()}, x[i])
          for i in np.ndindex(*lead)
      ]
      router = jax.tree.map(
          lambda *r: jnp.asarray(np.stack(r).reshape(lead + r[0].shape)), *fits
      )
      return {**mlp, ROUTER_NAME: router}
    return {k: visit(v, prefix + (k,)) for k, v in tree.items()}

  missing = [k for k in inputs if not k or k[-1] != MLP_NAME]
  if missing or not inputs:
    raise ValueError(
        f"inputs must map dense FFN paths to activations; got "
        f"{sorted(inputs)}."
    )
  return visit(params, ())
