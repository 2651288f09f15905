"""The router registry: the one list of tier-2 router kinds.

`DecoderConfig` validates `router` against `ROUTER_KINDS`, the MoE layer
builds its router with `make_router` and routing capture recognizes router
calls with `is_router`, so adding a router means adding one entry here.
"""

import dataclasses

import flax.linen as nn

from tiered_routing.model import routing
from tiered_routing.model import sequence_gates


@dataclasses.dataclass(frozen=True)
class RouterKind:
  """One entry of the router registry.

  Attributes:
    module: the router's flax module class.
    settings: the MoE layer settings its constructor takes besides
      `num_experts` (names of `make_router`'s keyword arguments).
  """
  module: type
  settings: tuple[str, ...]


ROUTERS = {
    'token_topk': RouterKind(routing.TokenTopKRouter,
                             ('top_k', 'jitter_noise')),
    'expert_choice': RouterKind(routing.ExpertChoiceRouter,
                                ('capacity_factor',)),
    'hash': RouterKind(routing.HashRouter, ('vocab_size', 'top_k')),
    'sequence_gate': RouterKind(sequence_gates.SequenceGateRouter, ('top_k',)),
}
ROUTER_KINDS = tuple(ROUTERS)


def make_router(kind: str, *, num_experts: int, name: str = 'router',
                **settings) -> nn.Module:
  """Builds router `kind` from the MoE layer's settings.

  Args:
    kind: one of ROUTER_KINDS.
    num_experts: E.
    name: the module name.
    **settings: any of top_k, jitter_noise, capacity_factor, vocab_size;
      each router takes those its registry entry lists (the others are
      ignored; one it takes but is not given keeps the router's default).
  """
  if kind not in ROUTERS:
    raise ValueError(f'unknown router kind {kind!r}; allowed: {ROUTER_KINDS}.')
  entry = ROUTERS[kind]
  kwargs = {k: settings[k] for k in entry.settings if k in settings}
  return entry.module(num_experts=num_experts, name=name, **kwargs)


def is_router(module: nn.Module) -> bool:
  """Whether `module` is one of the registered routers."""
  return isinstance(module, tuple(r.module for r in ROUTERS.values()))
