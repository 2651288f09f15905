"""The gradient unlearning methods GA, GradDiff, NPO(+retain), TRACE, as data.

A method is an immutable record of coefficients
(`combined_objective.Coefficients`, made by `FinetuneConfig.coefficients`
from the methods' own configs: `objectives.ObjectiveConfig`,
`trace.TraceConfig`), not a loop: all four run the one training loop
(`train.loop.run`) with the one step (`train.steps.train_step`) on
`combined_objective.UnlearningObjective`. The coefficients are *inputs* of
the compiled step, not constants, so all four methods share one compiled
program per model shape (on a CPU compiling dominates a short unlearning
run).

`update_mask` confines the update to the parameters the forget language
reached: under sharing 'attention' that is the shared parameters and the
forget partition's private ones; other partitions' experts are never touched
(the step zeroes their gradients and updates before and after the optimizer,
so clipping and weight decay cannot leak into them either).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax

from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.train import loop
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.train import train_state
from tiered_routing.unlearning import combined_objective
from tiered_routing.unlearning import held_out_stop
from tiered_routing.unlearning import objectives
from tiered_routing.unlearning import trace as trace_lib

METHODS = ("ga", "graddiff", "npo", "npo_retain", "trace")
# Without retain data (the forget language was its partition's only one)
# the methods of a group are the same objective, so run and shown once.
_SAME_WITHOUT_RETAIN = (("ga", "graddiff"), ("npo", "npo_retain", "trace"))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Settings shared by the gradient methods.

  Attributes:
    steps: optimizer steps per method.
    learning_rate: constant learning rate (no warmup: a few steps only).
    rows_per_batch: B, rows per partition of the forget and retain batches.
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
    """The objective a method minimises (TRACE: its retain-weighted one).

    'npo_retain' is NPO plus a plain retain NLL with TRACE's coefficients
    (forget and retain weights, beta): with TRACE's default NPO forgetting
    it is TRACE without the reweighting, its proper baseline, so that
    TRACE vs npo_retain isolates the routing-aware part."""
    if method == "trace":
      return self.trace.objective_config()
    if method == "npo_retain":
      return objectives.ObjectiveConfig(
          "npo",
          forget_coeff=self.trace.forget_coeff,
          retain_coeff=self.trace.retain_coeff,
          npo_beta=self.trace.npo_beta,
      )
    if method not in METHODS:
      raise ValueError(f"Unknown method {method!r}; allowed: {METHODS}.")
    retain = self.graddiff_retain_coeff if method == "graddiff" else None
    return objectives.ObjectiveConfig(
        method, retain_coeff=retain, npo_beta=self.npo_beta
    )

  def coefficients(self, method: str) -> combined_objective.Coefficients:
    """The method's record of coefficients (float32 scalars)."""
    config = self.objective_config(method)
    is_npo = config.name == "npo"
    f32 = np.float32
    return combined_objective.Coefficients(
        ga=f32(0.0 if is_npo else config.forget_coeff),
        npo=f32(config.forget_coeff if is_npo else 0.0),
        retain=f32(config.effective_retain_coeff),
        trace=f32(method == "trace"),
        npo_beta=f32(config.npo_beta),
    )


def identical_by_construction(
    methods: tuple[str, ...], has_retain_data: bool
) -> list[tuple[str, ...]]:
  """`methods` grouped into runs: each group is one objective.

  Without retain data the retain term is 0 whatever its weight, so GA =
  GradDiff and NPO = NPO+retain = TRACE: each group runs once (its first
  member) and is reported as one row named 'ga=graddiff' etc.
  """
  if has_retain_data:
    return [(m,) for m in methods]
  out, seen = [], set()
  for m in methods:
    if m in seen:
      continue
    group = next((g for g in _SAME_WITHOUT_RETAIN if m in g), (m,))
    members = tuple(x for x in group if x in methods)
    seen.update(members)
    out.append(members)
  return out


def update_mask(
    model: transformer.TieredDecoder, params: Any, partition: int
) -> Any:
  """1 for parameters a partition's update may change, 0 elsewhere.

  Shared parameters get a scalar 1; partition-private ones (leading logical
  axis 'partition') a one-hot over that axis, shaped to broadcast.
  """
  boxed = train_state.abstract_boxed_params(model)
  private = optimizers.partitioned_mask(boxed)
  p = model.config.num_partitions
  onehot = (np.arange(p) == partition).astype(np.float32)

  def leaf_mask(is_private, x):
    if not is_private:
      return np.ones((), np.float32)
    return onehot.reshape((p,) + (1,) * (np.ndim(x) - 1))

  return jax.tree.map(leaf_mask, private, params)


@dataclasses.dataclass(frozen=True)
class _Unlearner:
  """The optimizer and objective of one model config, and its compiled
  steps (one per placement of the state)."""

  tx: optax.GradientTransformation
  init: Callable[[Any], Any]
  objective: combined_objective.UnlearningObjective
  compiled: dict = dataclasses.field(default_factory=dict)

  def step(self, state: train_state.TrainState):
    """The jitted step, keeping the state where it is.

    Without fixed output shardings the first step's outputs could be laid
    out differently from its inputs and the second step would compile again
    (on a CPU, for as long as the first).
    """
    shardings = jax.tree.map(lambda x: x.sharding, state)
    key = (jax.tree.structure(shardings), tuple(jax.tree.leaves(shardings)))
    if key not in self.compiled:
      self.compiled[key] = jax.jit(
          functools.partial(
              steps.train_step, objective=self.objective, tx=self.tx
          ),
          out_shardings=(shardings, state.step.sharding),
          donate_argnums=0,
      )
    return self.compiled[key]


@functools.lru_cache(maxsize=None)
def _unlearner(
    model_config: decoder_config.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    config: FinetuneConfig,
) -> _Unlearner:
  """Builds (once per argument tuple) the optimizer and objective.

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
  boxed = train_state.abstract_boxed_params(model)
  tx = optimizers.make_optimizer(
      opt, config.steps, optimizers.partitioned_mask(boxed)
  )
  objective = combined_objective.UnlearningObjective(
      model, config.trace.w_min, config.trace.w_max
  )
  return _Unlearner(tx, jax.jit(tx.init), objective)


def _replicated_like(sharding):
  """A replicated sharding on the same devices (for scalars)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


def _initial_state(unlearner: _Unlearner, params: Any):
  """A fresh state on a copy of `params` (the originals stay NPO's
  reference), committed where the step's outputs will be: an uncommitted
  first state would make the second step compile again."""
  new = jax.tree.map(jnp.copy, params)
  scalar = _replicated_like(jax.tree.leaves(new)[0].sharding)
  devices = jax.tree.leaves(new)[0].sharding.device_set

  def commit(x):
    # Optimizer leaves made from no parameter (a partitionwise count) land
    # on the default device; on a mesh of several devices they must be on
    # the parameters' devices, replicated, or the step refuses them.
    on_mesh = x.sharding.device_set == devices
    return jax.device_put(x, x.sharding if on_mesh else scalar)

  return train_state.TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), scalar),
      params=new,
      opt_state=jax.tree.map(commit, unlearner.init(new)),
  )


def _check_paired(forget, retain) -> int:
  """The number of steps of paired forget / retain batches."""
  num_steps = len(forget["decoder_input_tokens"])
  if len(retain["decoder_input_tokens"]) != num_steps:
    raise ValueError(
        "forget_batches and retain_batches must hold the same "
        "number of batches."
    )
  return num_steps


def _paired_steps(forget, retain):
  """Step i's {'forget', 'retain'} host batch of [I, P, B, L] batches."""
  for i in range(len(forget["decoder_input_tokens"])):
    yield {
        "forget": {k: v[i] for k, v in forget.items()},
        "retain": {k: v[i] for k, v in retain.items()},
    }


def _recorder(
    history: list,
    stop: Optional[held_out_stop.HeldOutStop],
    model_config: decoder_config.DecoderConfig,
) -> loop.Hook:
  """Keeps every step's device metrics (with the held-out NLL after the
  step when stopping) and stops after the first step that reached the
  target."""

  def hook(done, state, metrics):
    del done
    if stop is None:
      history.append(metrics)
      return False
    held_out = held_out_stop.mean_nll(model_config, state.params, stop.batch)
    history.append({**metrics, "held_out_forget_nll": held_out})
    return held_out >= stop.target_nll

  return hook


def unlearn(
    model_config: decoder_config.DecoderConfig,
    optimizer_config: optimizers.OptimizerConfig,
    config: FinetuneConfig,
    params: Any,
    batches: dict[str, Any],
    method: combined_objective.Coefficients,
    critical_MxPxE: np.ndarray,
    update_mask_tree: Optional[Any] = None,
    to_device: Callable[[Any], Any] = lambda b: b,
    stop: Optional[held_out_stop.HeldOutStop] = None,
) -> tuple[Any, dict[str, np.ndarray]]:
  """Runs one gradient method over (at most) N forget / retain batches.

  Args:
    model_config: the model being unlearned.
    optimizer_config: its training optimizer (see `_unlearner`).
    config: the gradient methods' settings.
    params: the trained parameters (not modified; NPO's reference).
    batches: {'forget': {feature: [I, P, B, L]}, 'retain': same shape}.
    method: `config.coefficients(name)`.
    critical_MxPxE: bool forget-critical experts (TRACE; any value else).
    update_mask_tree: `update_mask(...)`, or None to update everything.
    to_device: places a host batch (e.g. on a mesh).
    stop: if set, the loop ends after the first step whose held-out forget
      NLL (after that step's update) reaches the target: at most one step
      past it.

  Returns:
    (new params, {metric: float64 [steps taken]} per step).
  """
  forget, retain = batches["forget"], batches["retain"]
  num_steps = _check_paired(forget, retain)
  unlearner = _unlearner(model_config, optimizer_config, config)
  state = _initial_state(unlearner, params)
  step_fn = unlearner.step(state)
  inputs = steps.StepInputs(
      update_mask=update_mask_tree,
      objective=combined_objective.UnlearningInputs(
          params, jnp.asarray(critical_MxPxE, bool), method
      ),
  )
  rng = jax.random.key(0)  # Unused: the objective is deterministic.
  history = []
  state, _ = loop.run(
      lambda state, batch: step_fn(state, batch, rng, inputs),
      state,
      _paired_steps(forget, retain),
      start=0,
      end=num_steps,
      to_device=lambda b: {k: to_device(v) for k, v in b.items()},
      hooks=[_recorder(history, stop, model_config)],
  )
  history = jax.device_get(history)
  return state.params, {
      k: np.array([h[k] for h in history], np.float64) for k in history[0]
  }
