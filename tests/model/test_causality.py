"""Causality of whole decoders under the content-based routers.

A language model's logits at position t may depend only on the tokens of its
own segment at positions <= t; otherwise its loss is measured with a peek at
the tokens it predicts. Attention is masked for that (test_transformer.py);
here the routers are checked in a full `TieredDecoder`: the Jacobian of
every token's logits w.r.t. every token's embedding, with rows told apart
(two packed rows share each routing group), must vanish outside that set.

Routers that read later tokens fail it: the whole-segment mean of the old
sequence gates (`SequenceGateRouter(causal=False)`, reachable here only by
swapping the registry entry) and expert choice, whose experts pick tokens
by comparing the whole group. Expert choice's dependence goes through
discrete choices, which a Jacobian does not see, so it is shown by changing
later tokens instead.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import layers
from tiered_routing.model import router_registry
from tiered_routing.model import sequence_gates
from tiered_routing.model import transformer

P, B, L, V = 2, 2, 8, 32
N = P * B * L
SEGMENTS = np.array([1, 1, 1, 2, 2, 2, 2, 0])  # Two segments and padding.
POSITIONS = np.array([0, 1, 2, 0, 1, 2, 3, 0])


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  with jax.threefry_partitionable(False):
    yield


class _WholeSegmentGates(sequence_gates.SequenceGateRouter):
  """The old, non-causal sequence gates (whole-segment mean)."""
  causal: bool = False


@pytest.fixture
def whole_segment_gates(monkeypatch):
  """Makes router 'sequence_gate' build the non-causal variant."""
  monkeypatch.setitem(router_registry.ROUTERS, "sequence_gate",
                      router_registry.RouterKind(_WholeSegmentGates,
                                                 ("top_k",)))


def _model(router, capacity_factor=4.0):
  # Sharing 'attention' runs partition-private MoE layers on regrouped rows;
  # group_size 16 puts two packed rows in every routing group. Capacity 4.0
  # (= E / K for token choice) drops nothing.
  config = decoder_config.DecoderConfig(
      vocab_size=V, d_model=16, num_heads=2, head_dim=8, num_layers=2,
      d_ff=32, num_experts=4, expert_d_ff=8, moe_every=1, num_partitions=P,
      sharing="attention", group_size=16, dispatch="sort_gather",
      capacity_factor=capacity_factor, router=router)
  model = transformer.TieredDecoder(config)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   _tokens()))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), shapes)
  return model, variables


def _tokens(seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (P, B, L), 0, V)


def _apply(model, variables, tokens):
  return model.apply(variables, tokens,
                     segment_ids_PxBxL=jnp.broadcast_to(SEGMENTS, tokens.shape),
                     positions_PxBxL=jnp.broadcast_to(POSITIONS, tokens.shape))


def _token_jacobian(model, variables):
  """[N, N] norms of d(projected logits of token i) / d(embedding of j)."""
  proj = jax.random.normal(jax.random.PRNGKey(2), (P, B, L, V))

  def logits_of(delta_PxBxLxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (isinstance(context.module, layers.Embed)
          and context.method_name == "__call__"):
        out = out + delta_PxBxLxD.reshape(out.shape)
      return out
    with nn.intercept_methods(add_delta):
      logits = _apply(model, variables, _tokens())
    return jnp.sum(logits * proj, axis=-1).reshape(N)

  jac = jax.jacrev(logits_of)(jnp.zeros((P, B, L, model.config.d_model)))
  return np.asarray(jnp.abs(jac).sum(-1).reshape(N, N))


def _relations():
  """bool [N, N] each: same row and segment; and j <= i (token order)."""
  row = np.arange(N) // L
  seg = np.tile(SEGMENTS, P * B)
  pos = np.arange(N) % L
  same = (row[:, None] == row[None, :]) & (seg[:, None] == seg[None, :])
  return same, pos[None, :] <= pos[:, None]


@functools.lru_cache(maxsize=None)
def _jitted_jacobian(router, causal):
  del causal  # Part of the cache key: the registry entry differs.
  model, variables = _model(router)
  return _token_jacobian(model, variables)


@pytest.mark.parametrize("router", ["token_topk", "sequence_gate"])
def test_logits_depend_only_on_the_segment_prefix(router):
  norms = _jitted_jacobian(router, True)
  same, earlier = _relations()
  visible = same & earlier
  assert np.all(norms[~visible] == 0.0)
  assert np.all(norms[visible] > 0.0)


def test_whole_segment_sequence_gates_read_later_tokens(whole_segment_gates):
  # The same check fails for the old whole-segment mean: logits depend on
  # later tokens of their own segment (and still on nothing else).
  del whole_segment_gates
  norms = _jitted_jacobian("sequence_gate", False)
  same, earlier = _relations()
  assert np.any(norms[same & ~earlier] > 0.0)
  assert np.all(norms[~same] == 0.0)


@pytest.mark.parametrize("router, capacity_factor, causal", [
    ("sequence_gate", 4.0, True), ("token_topk", 4.0, True),
    ("expert_choice", 1.0, False), ("token_topk", 1.0, False)])
def test_changing_later_tokens(router, capacity_factor, causal):
  # Rewrite every token after position 3 (all rows) and compare positions
  # 0..3. Expert choice (capacity 1: each expert takes 4 of a group's 16
  # tokens) lets later tokens take an expert from earlier ones. So do the
  # capacity drops of token choice (last case: a later token's first choice
  # can take the slot of an earlier token's second), for every router; the
  # causal cases here drop nothing.
  model, variables = _model(router, capacity_factor)
  tokens = _tokens()
  changed = tokens.at[..., 4:].set((tokens[..., 4:] + 7) % V)
  run = jax.jit(functools.partial(_apply, model))
  diff = jnp.abs(run(variables, tokens) - run(variables, changed))
  earlier_diff = float(diff[..., :4, :].max())
  assert float(diff[..., 4:6, :].max()) > 1e-3
  if causal:
    assert earlier_diff == 0.0
  else:
    assert earlier_diff > 1e-3
