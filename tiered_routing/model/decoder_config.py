"""`DecoderConfig`: the hyper-parameters of `TieredDecoder`, checked when built.

A config that cannot build a model (an unknown router, top_k above the
number of experts, a dense layer without d_ff, ...) raises a ValueError that
names the field, its value and what is allowed, before anything is traced.
Sharing levels (how much the tier-1 partitions share) are described in
`transformer`.
"""

import dataclasses

import jax.numpy as jnp

from tiered_routing.model import dispatch as dispatch_lib
from tiered_routing.model import layers
from tiered_routing.model import router_registry

SHARING_LEVELS = ("none", "attention", "all")
DISPATCH_IMPLS = dispatch_lib.IMPLS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of `TieredDecoder` (validated on construction).

  Attributes:
    vocab_size: V.
    d_model: residual width D.
    num_heads: attention heads H.
    head_dim: per-head width Q (even: rotary embeddings rotate pairs).
    num_layers: number of decoder blocks.
    d_ff: hidden size of the dense feed-forward layers (needed iff some layer
      is dense).
    num_experts: experts per partition in every MoE layer; 0 = dense model.
    expert_d_ff: hidden size of each expert.
    top_k: experts per token (token-choice, hash and sequence-gate routers).
    moe_every: layer i is MoE iff i % moe_every == moe_every - 1.
    shared_expert_d_ff: hidden size of an always-on dense expert added to
      every MoE layer; 0 = none.
    num_partitions: P, the number of tier-1 partitions.
    sharing: 'none', 'attention' or 'all' (see module docstring).
    router: tier-2 router kind, one of `router_registry.ROUTER_KINDS`.
    router_jitter: Switch multiplicative jitter noise (token_topk only).
    dispatch: dispatch implementation, one of DISPATCH_IMPLS.
    capacity_factor: expert capacity factor (GShard / Switch).
    group_size: tokens per routing group (see `moe.group_shape`).
    gated_mlp: gated (GEGLU-style) dense and expert feed-forwards.
    activation: feed-forward activation, one of `layers.ACTIVATIONS`.
    dtype: activation dtype name, one of DTYPES (parameters are float32).
    tie_embeddings: share the input embedding with the output projection.
    dropout_rate: dropout on attention probabilities and block outputs.
    rope_max_wavelength: base of the rotary frequencies.
  """

  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int
  num_layers: int
  d_ff: int = 0
  num_experts: int = 0
  expert_d_ff: int = 0
  top_k: int = 2
  moe_every: int = 1
  shared_expert_d_ff: int = 0
  num_partitions: int = 1
  sharing: str = "none"
  router: str = "token_topk"
  router_jitter: float = 0.0
  dispatch: str = "auto"
  capacity_factor: float = 1.25
  group_size: int = 4096
  gated_mlp: bool = True
  activation: str = "gelu"
  dtype: str = "float32"
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  rope_max_wavelength: float = 10_000.0

  def __post_init__(self):
    self._check_choices()
    self._check_sizes()

  def _check_choices(self):
    for name, allowed in (("sharing", SHARING_LEVELS),
                          ("router", router_registry.ROUTER_KINDS),
                          ("dispatch", DISPATCH_IMPLS),
                          ("dtype", tuple(DTYPES)),
                          ("activation", tuple(layers.ACTIVATIONS))):
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(
            f"DecoderConfig.{name}={value!r} is invalid; allowed: {allowed}.")

  def _check_sizes(self):
    positive = ("vocab_size", "d_model", "num_heads", "head_dim", "num_layers",
                "moe_every", "num_partitions", "group_size")
    non_negative = ("d_ff", "num_experts", "expert_d_ff", "shared_expert_d_ff")
    for name in positive + non_negative:
      value = getattr(self, name)
      low = 1 if name in positive else 0
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DecoderConfig.{name}={value!r} must be an int "
                         f">= {low}.")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even "
                       "(rotary embeddings rotate pairs of features).")
    if self.num_experts and not self.expert_d_ff:
      raise ValueError(f"DecoderConfig.expert_d_ff={self.expert_d_ff} must be "
                       f"positive when num_experts={self.num_experts}.")
    if any(not self.is_moe_layer(i) for i in range(self.num_layers)) and (
        not self.d_ff):
      raise ValueError(f"DecoderConfig.d_ff={self.d_ff} must be positive: "
                       "some layers are dense (num_experts="
                       f"{self.num_experts}, moe_every={self.moe_every}).")
    if self.num_experts and self.router != "expert_choice" and not (
        1 <= self.top_k <= self.num_experts):
      raise ValueError(f"DecoderConfig.top_k={self.top_k} must be in "
                       f"[1, num_experts={self.num_experts}].")
    if not self.capacity_factor > 0:
      raise ValueError(f"DecoderConfig.capacity_factor="
                       f"{self.capacity_factor} must be positive.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"DecoderConfig.dropout_rate={self.dropout_rate} must "
                       "be in [0, 1).")

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i uses a MoE feed-forward."""
    return self.num_experts > 0 and i % self.moe_every == self.moe_every - 1

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers in order; entry m is MoE layer m of masks."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def activation_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]

  @property
  def experts_per_layer(self) -> int:
    """Experts one MoE layer holds for the rows it sees ('all': P * E)."""
    if self.sharing == "all":
      return self.num_partitions * self.num_experts
    return self.num_experts
