"""The objective of the gradient unlearning methods, one function for all four.

  c_ga * GA(forget) + c_npo * NPO(forget) + c_retain * NLL(retain; w)

A method is an immutable record of its coefficients (`Coefficients`); w are
the retain tokens' loss weights, multiplied by the TRACE importance weights
when `trace` is 1 (`trace.retain_token_weights`). For every method the value
equals `objectives.unlearning_loss` / `trace.trace_loss` on the same batch
(tested). `gradient_methods` runs it in the one training loop.

Per step the model runs once on a forget batch and once on a retain batch,
both `[P, B, L]`, capturing each token's routing (`model.routing_capture`):
TRACE reweights the retain tokens that reach forget-critical experts *under
the current parameters*, with the forget frequency measured on the same
step's forget batch. NPO's reference log-likelihoods come from the frozen
original parameters, computed only when the NPO coefficient is non-zero
(`lax.cond`). Router balancing losses are not part of the objective: they
regularise pre-training and say nothing about what to forget.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from tiered_routing.model import forward as forward_lib
from tiered_routing.model import transformer
from tiered_routing.tier1 import layout
from tiered_routing.unlearning import objectives
from tiered_routing.unlearning import trace as trace_lib


@flax.struct.dataclass
class Coefficients:
  """One gradient method: the weights of the objective's terms.

  Attributes:
    ga: weight of gradient ascent on the forget batch.
    npo: weight of NPO on the forget batch.
    retain: weight of the retain NLL.
    trace: 1.0 to reweight retain tokens by TRACE, else 0.0.
    npo_beta: NPO's inverse temperature.
  """

  ga: jax.Array
  npo: jax.Array
  retain: jax.Array
  trace: jax.Array
  npo_beta: jax.Array


@flax.struct.dataclass
class UnlearningInputs:
  """The step's fixed inputs besides parameters and batch.

  Attributes:
    reference_params: the original parameters (NPO's reference, frozen).
    critical_MxPxE: bool forget-critical experts (TRACE; any value else).
    coefficients: the method.
  """

  reference_params: Any
  critical_MxPxE: jax.Array
  coefficients: Coefficients


def _forward(model, params, batch):
  """Logits and routing of one [P, B, L] batch (deterministic)."""
  out = forward_lib.forward(model, params, batch, capture_routing=True)
  return out.logits_PxBxLxV, out.routing


def _token_log_probs(logits, batch) -> objectives.TokenLogProbs:
  """Per-token log-likelihoods with rows flattened to [P*B, L]."""
  logp = objectives.token_log_likelihood(logits, batch["decoder_target_tokens"])
  flat = lambda x: x.reshape(-1, x.shape[-1])
  segments = batch.get("decoder_segment_ids")
  return objectives.TokenLogProbs(
      flat(logp),
      flat(batch["decoder_loss_weights"].astype(jnp.float32)),
      None if segments is None else flat(segments),
  )


def combined_loss(params, batch, inputs: UnlearningInputs, *, objective):
  """The objective of the module docstring and its metrics.

  Args:
    params: the parameters being unlearned.
    batch: {'forget': [P, B, L] features, 'retain': [P, B, L] features}.
    inputs: reference parameters, critical experts, coefficients.
    objective: the `UnlearningObjective` (model and TRACE clip range).
  """
  model, c = objective.model, inputs.coefficients
  forget, retain = batch["forget"], batch["retain"]
  logits_f, routing_f = _forward(model, params, forget)
  logits_r, routing_r = _forward(model, params, retain)
  f = _token_log_probs(logits_f, forget)
  r = _token_log_probs(logits_r, retain)
  ref_logp = jax.lax.cond(
      c.npo > 0,
      lambda: _token_log_probs(
          _forward(model, inputs.reference_params, forget)[0], forget
      ).logp,
      lambda: jnp.zeros_like(f.logp),
  )
  ga_loss, _ = objectives.gradient_ascent(f)
  npo_loss, npo_metrics = objectives.npo(f, ref_logp, c.npo_beta)
  pids = layout.token_partition_ids(forget["decoder_input_tokens"].shape)
  critical = inputs.critical_MxPxE
  f_hits = trace_lib.critical_hits(routing_f, critical, pids)
  f_freq = trace_lib.activation_frequency(f_hits, f.weights.reshape(-1) > 0)
  r_hits = trace_lib.critical_hits(routing_r, critical, pids)
  trace_w, trace_metrics = trace_lib.retain_token_weights(
      r_hits, r.weights.reshape(-1) > 0, f_freq, objective.w_min,
      objective.w_max,
  )
  trace_w = jnp.where(c.trace > 0, trace_w.reshape(r.weights.shape), 1.0)
  retain_nll = objectives.mean_nll(r.logp, r.weights * trace_w)
  loss = c.ga * ga_loss + c.npo * npo_loss + c.retain * retain_nll
  metrics = {
      "loss": loss,
      "forget_nll": objectives.mean_nll(f.logp, f.weights),
      "retain_nll": objectives.mean_nll(r.logp, r.weights),
      "npo_weight": npo_metrics["npo_weight"],
      **trace_metrics,
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class UnlearningObjective:
  """`combined_loss` as the objective of `train.steps.train_step`.

  Attributes:
    model: the decoder.
    w_min, w_max: TRACE's clip range of the critical-token weight.
  """

  model: transformer.TieredDecoder
  w_min: float
  w_max: float

  def gradients(self, params, batch, rng, inputs: UnlearningInputs):
    del rng  # Deterministic: no dropout, no router jitter.
    grad_fn = jax.grad(combined_loss, has_aux=True)
    return grad_fn(params, batch, inputs, objective=self)
