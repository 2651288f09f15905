"""Optimizer loop of the gradient unlearning methods: GA, GradDiff, NPO, TRACE.

Every method minimises

  c_ga * GA(forget) + c_npo * NPO(forget) + c_retain * NLL(retain; w)

where w are the retain tokens' loss weights, multiplied by the TRACE
importance weights for TRACE (`trace.retain_token_weights`), and the
coefficients come from the methods' own configs (`objectives.ObjectiveConfig`,
`trace.TraceConfig`). The coefficients are *arguments* of one jitted step, not
constants, so all four methods share one compiled program per model shape
(on a CPU compiling dominates a short unlearning run). For every method the
value equals `objectives.unlearning_loss` / `trace.trace_loss` on the same
batch (tested).

Per step the model runs once on a forget batch and once on a retain batch,
both `[P, R, L]`, capturing each token's routing (`token_routing`): TRACE
reweights the retain tokens that reach forget-critical experts *under the
current parameters*, with the forget frequency measured on the same step's
forget batch. NPO's reference log-likelihoods come from the frozen original
parameters, computed only when the NPO coefficient is non-zero (`lax.cond`).
Router balancing losses are not part of the objective: they regularise
pre-training and say nothing about what to forget.

`update_mask` confines the update to the parameters the forget language
reached: under sharing 'attention' that is the shared parameters and the
forget partition's private ones; other partitions' experts are never
touched (their gradients and updates are zeroed before and after the
optimizer, so clipping and weight decay cannot leak into them either).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from tiered_routing.train import optimizers
from tiered_routing.model import transformer
from tiered_routing.unlearning import objectives
from tiered_routing.model import routing_capture
from tiered_routing.unlearning import trace as trace_lib

METHODS = ("ga", "graddiff", "npo", "trace")
# Order of the entries of the coefficient vector.
_GA, _NPO, _RETAIN, _TRACE, _BETA = range(5)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Settings shared by the gradient methods.

  Attributes:
    steps: optimizer steps per method.
    learning_rate: constant learning rate (no warmup: a few steps only).
    rows_per_batch: R, rows per partition of the forget and retain batches.
    graddiff_retain_coeff: GradDiff's retain coefficient.
    npo_beta: NPO inverse temperature (also TRACE's, with NPO forgetting).
    trace: TRACE settings (forget objective, coefficients, weight clip).
    stop_at_reference: stop a method once its forget-batch NLL reaches the
      never-saw-it reference model's forget loss. A fixed step budget
      compares methods by how far each overshoots (gradient ascent does not
      stop by itself); stopping at the reference compares their utility
      cost at about the same forget quality, the comparison the trade-off
      is about. `steps` is then the most a method may take.
  """

  steps: int = 20
  learning_rate: float = 1e-3
  rows_per_batch: int = 4
  graddiff_retain_coeff: float = 1.0
  npo_beta: float = 0.1
  trace: trace_lib.TraceConfig = trace_lib.TraceConfig()
  stop_at_reference: bool = False

  def __post_init__(self):
    for name in ("steps", "rows_per_batch"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"FinetuneConfig.{name}={value!r} must be an int " ">= 1."
        )
    if not self.learning_rate > 0:
      raise ValueError(
          f"FinetuneConfig.learning_rate={self.learning_rate!r}" " must be > 0."
      )
    self.objective_config("graddiff")  # Validates the coefficients.
    self.objective_config("npo")

  def objective_config(self, method: str) -> objectives.ObjectiveConfig:
    """The objective a method minimises (TRACE: its retain-weighted one)."""
    if method == "trace":
      return self.trace.objective_config()
    if method not in METHODS:
      raise ValueError(f"Unknown method {method!r}; allowed: {METHODS}.")
    retain = self.graddiff_retain_coeff if method == "graddiff" else None
    return objectives.ObjectiveConfig(
        method, retain_coeff=retain, npo_beta=self.npo_beta
    )

  def coefficients(self, method: str) -> np.ndarray:
    """float32 [5]: (c_ga, c_npo, c_retain, use_trace, npo_beta)."""
    config = self.objective_config(method)
    out = np.zeros(5, np.float32)
    out[_NPO if config.name == "npo" else _GA] = config.forget_coeff
    out[_RETAIN] = config.effective_retain_coeff
    out[_TRACE] = float(method == "trace")
    out[_BETA] = config.npo_beta
    return out


def _forward(model, params, batch):
  """Logits and routing of one [P, R, L] batch (deterministic)."""
  logits, routing, _ = routing_capture.apply_with_routing(
      model,
      {"params": params},
      batch["decoder_input_tokens"],
      segment_ids_PxBxL=batch.get("decoder_segment_ids"),
      positions_PxBxL=batch.get("decoder_positions"),
      deterministic=True,
  )
  return logits, routing


def _token_log_probs(logits, batch) -> objectives.TokenLogProbs:
  """Per-token log-likelihoods with rows flattened to [P*R, L]."""
  logp = objectives.token_log_likelihood(logits, batch["decoder_target_tokens"])
  flat = lambda x: x.reshape(-1, x.shape[-1])
  segments = batch.get("decoder_segment_ids")
  return objectives.TokenLogProbs(
      flat(logp),
      flat(batch["decoder_loss_weights"].astype(jnp.float32)),
      None if segments is None else flat(segments),
  )


def combined_loss(
    params,
    ref_params,
    forget,
    retain,
    critical_LxPxE,
    coeffs,
    *,
    model,
    w_min,
    w_max,
):
  """The objective of the module docstring and its metrics."""
  logits_f, routing_f = _forward(model, params, forget)
  logits_r, routing_r = _forward(model, params, retain)
  f = _token_log_probs(logits_f, forget)
  r = _token_log_probs(logits_r, retain)
  ref_logp = jax.lax.cond(
      coeffs[_NPO] > 0,
      lambda: _token_log_probs(
          _forward(model, ref_params, forget)[0], forget
      ).logp,
      lambda: jnp.zeros_like(f.logp),
  )
  ga_loss, _ = objectives.gradient_ascent(f)
  npo_loss, npo_metrics = objectives.npo(f, ref_logp, coeffs[_BETA])
  pids = routing_capture.token_partition_ids(forget["decoder_input_tokens"].shape)
  f_hits = trace_lib.critical_hits(routing_f, critical_LxPxE, pids)
  f_freq = trace_lib.activation_frequency(f_hits, f.weights.reshape(-1) > 0)
  r_hits = trace_lib.critical_hits(routing_r, critical_LxPxE, pids)
  trace_w, trace_metrics = trace_lib.retain_token_weights(
      r_hits, r.weights.reshape(-1) > 0, f_freq, w_min, w_max
  )
  trace_w = jnp.where(coeffs[_TRACE] > 0, trace_w.reshape(r.weights.shape), 1.0)
  retain_nll = objectives.mean_nll(r.logp, r.weights * trace_w)
  loss = (
      coeffs[_GA] * ga_loss
      + coeffs[_NPO] * npo_loss
      + coeffs[_RETAIN] * retain_nll
  )
  metrics = {
      "loss": loss,
      "forget_nll": objectives.mean_nll(f.logp, f.weights),
      "retain_nll": objectives.mean_nll(r.logp, r.weights),
      "npo_weight": npo_metrics["npo_weight"],
      **trace_metrics,
  }
  return loss, metrics


def _boxed_params(model: transformer.TieredDecoder) -> Any:
  """Abstract boxed parameters (their logical axes); nothing allocated."""
  tokens = jnp.zeros((model.config.num_partitions, 1, 2), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def update_mask(
    model: transformer.TieredDecoder, params: Any, partition: int
) -> Any:
  """1 for parameters a partition's update may change, 0 elsewhere.

  Shared parameters get a scalar 1; partition-private ones (leading logical
  axis 'partition') a one-hot over that axis, shaped to broadcast.
  """
  private = optimizers.partitioned_mask(_boxed_params(model))
  p = model.config.num_partitions
  onehot = np.zeros(p, np.float32)
  onehot[partition] = 1.0

  def leaf_mask(is_private, x):
    if not is_private:
      return np.ones((), np.float32)
    return onehot.reshape((p,) + (1,) * (np.ndim(x) - 1))

  return jax.tree.map(leaf_mask, private, params)


def _step(
    params,
    opt_state,
    ref_params,
    forget,
    retain,
    critical_LxPxE,
    coeffs,
    mask,
    *,
    model,
    tx,
    w_min,
    w_max,
):
  grad_fn = jax.grad(
      functools.partial(combined_loss, model=model, w_min=w_min, w_max=w_max),
      has_aux=True,
  )
  grads, metrics = grad_fn(
      params, ref_params, forget, retain, critical_LxPxE, coeffs
  )
  grads = jax.tree.map(lambda g, m: g * m, grads, mask)
  updates, opt_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u, m: u * m, updates, mask)
  return optax.apply_updates(params, updates), opt_state, metrics


def _replicated_like(sharding):
  """A replicated sharding on the same devices (for scalar outputs)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


@dataclasses.dataclass(frozen=True)
class Finetuner:
  """The optimizer and step of one model config; `step` jits on demand.

  Attributes:
    model: the decoder.
    tx: its unlearning optimizer.
    init: jitted `tx.init`.
    step_fn: the un-jitted step (`_step` with the model bound).
  """

  model: transformer.TieredDecoder
  tx: optax.GradientTransformation
  init: Any
  step_fn: Any
  _compiled: dict = dataclasses.field(default_factory=dict)

  def step(self, params: Any, opt_state: Any):
    """The jitted step, keeping `params` and `opt_state` where they are.

    Without fixed output shardings the first step's outputs could be laid
    out differently from its inputs and the second step would compile again
    (on a CPU, for as long as the first).
    """
    shardings = (
        jax.tree.map(lambda x: x.sharding, params),
        jax.tree.map(lambda x: x.sharding, opt_state),
    )
    key = (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))
    if key not in self._compiled:
      scalar = _replicated_like(jax.tree.leaves(shardings)[0])
      self._compiled[key] = jax.jit(
          self.step_fn,
          out_shardings=(*shardings, scalar),
          donate_argnums=(0, 1),
      )
    return self._compiled[key]


@functools.lru_cache(maxsize=None)
def make_finetuner(
    model_config: transformer.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    config: FinetuneConfig,
) -> Finetuner:
  """Builds (once per argument tuple) the optimizer and step.

  The optimizer is the training optimizer's family and settings
  (`optimizer_config`: AdamW or Adafactor, clipping, partition-wise for
  private parameters) with a constant `config.learning_rate`.
  """
  model = transformer.TieredDecoder(model_config)
  opt = dataclasses.replace(
      optimizer_config,
      learning_rate=config.learning_rate,
      schedule="constant",
      warmup_steps=0,
      decay_steps=None,
      weight_decay=0.0,
  )
  tx = optimizers.make_optimizer(
      opt, config.steps, optimizers.partitioned_mask(_boxed_params(model))
  )
  step_fn = functools.partial(
      _step,
      model=model,
      tx=tx,
      w_min=config.trace.w_min,
      w_max=config.trace.w_max,
  )
  return Finetuner(model, tx, jax.jit(tx.init), step_fn)


def finetune(
    finetuner: Finetuner,
    params: Any,
    forget_batches,
    retain_batches,
    coeffs: np.ndarray,
    critical_LxPxE: np.ndarray,
    mask: Any,
    to_device=lambda b: b,
    stop_nll: float | None = None,
) -> tuple[Any, dict]:
  """Runs the unlearning loop over (at most) N forget / retain batches.

  Args:
    finetuner: from `make_finetuner`.
    params: the trained parameters (not modified; the reference for NPO).
    forget_batches: {feature: [N, P, R, L]} forget-language rows.
    retain_batches: {feature: [N, P, R, L]} retain rows.
    coeffs: `FinetuneConfig.coefficients(method)`.
    critical_LxPxE: bool forget-critical experts (TRACE; any value else).
    mask: `update_mask(...)` (or all ones).
    to_device: places a host batch (e.g. on a mesh).
    stop_nll: if set, the loop ends after the first step whose forget batch
      NLL (per token, measured before that step's update) is >= stop_nll:
      at most one step past the target.

  Returns:
    (new params, {metric: float64 [steps taken]} per step).
  """
  num_steps = len(forget_batches["decoder_input_tokens"])
  if len(retain_batches["decoder_input_tokens"]) != num_steps:
    raise ValueError(
        "forget_batches and retain_batches must hold the same "
        "number of batches."
    )
  new = jax.tree.map(jnp.copy, params)
  # Committed, like the step's outputs: an uncommitted first state would
  # make the second step compile again.
  opt_state = jax.tree.map(
      lambda x: jax.device_put(x, x.sharding), finetuner.init(new)
  )
  critical = jnp.asarray(critical_LxPxE, bool)
  coeffs = jnp.asarray(coeffs, jnp.float32)
  history = []
  for i in range(num_steps):
    forget = to_device({k: v[i] for k, v in forget_batches.items()})
    retain = to_device({k: v[i] for k, v in retain_batches.items()})
    new, opt_state, metrics = finetuner.step(new, opt_state)(
        new, opt_state, params, forget, retain, critical, coeffs, mask
    )
    history.append(metrics)
    # Reading the NLL waits for the step; only do it when stopping early.
    if stop_nll is not None and float(metrics["forget_nll"]) >= stop_nll:
      break
  history = jax.device_get(history)
  return new, {
      k: np.array([h[k] for h in history], np.float64) for k in history[0]
  }
