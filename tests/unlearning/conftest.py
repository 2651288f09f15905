"""Shared fixtures: a tiny TieredDecoder per sharing level, jitted once."""

import functools

import jax
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import forward
from tiered_routing.model import transformer

P, B, L, E = 2, 2, 6, 4


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  # XLA:CPU compiles partitionable threefry ~6x slower; no test here needs
  # sharding-invariant random draws. Module scope: the setting must not leak
  # into other test directories.
  with jax.threefry_partitionable(False):
    yield


def _routed_forward(model, params, batch, **masks):
  """(logits, TokenRouting, intermediates) of one forward pass."""
  out = forward.forward(model, params, batch, capture_routing=True, **masks)
  return out.logits_PxBxLxV, out.routing, out.intermediates


class TinyModel:
  """A 2-layer MoE decoder with jitted init and routing-capturing forward."""

  def __init__(self, sharing: str):
    self.config = decoder_config.DecoderConfig(
        vocab_size=32,
        d_model=16,
        num_heads=2,
        head_dim=8,
        num_layers=2,
        d_ff=16,
        num_experts=E,
        expert_d_ff=8,
        top_k=2,
        moe_every=1,
        num_partitions=P,
        sharing=sharing,
        group_size=2 * L,
        dispatch="reference",
    )
    self.model = transformer.TieredDecoder(self.config)
    self.tokens = jax.random.randint(jax.random.PRNGKey(0), (P, B, L), 1, 32)
    self.variables = jax.jit(self.model.init)(
        jax.random.PRNGKey(1), self.tokens
    )
    self.params = self.variables["params"]
    # routed_forward(params, batch, **expert masks).
    self.routed_forward = jax.jit(
        functools.partial(_routed_forward, self.model)
    )


@pytest.fixture(scope="session")
def tiny_model():
  """tiny_model(sharing) -> TinyModel, built once per sharing level."""
  cache = {}

  def get(sharing: str) -> TinyModel:
    if sharing not in cache:
      cache[sharing] = TinyModel(sharing)
    return cache[sharing]

  return get
