"""Tier-2 routers: token choice, expert choice and hash routing.

Every router maps the T tokens of one group to K expert slots per token and
returns a token-major `RouterOutput`; `dispatch.moe_mlp` consumes it. Routers
compute in float32 whatever the activation dtype: Switch Transformer (Fedus et
al. 2021, "selective precision") found bfloat16 routers unstable.

Shared conventions: `expert_mask_TxE` (bool, True = allowed) removes experts
per token (logit `MASKED_LOGIT`, probability exactly 0, never a non-zero
combine weight); this one hook serves tier-1 partition masking, unlearning by
expert masking and forced routing. `segment_ids_T` 0 marks padding, routed
nowhere (no capacity used, not in the auxiliary losses). A combine weight of
0.0 marks an unused slot.

The expert-owned sequence gates live in `sequence_gates`; `router_registry`
lists every kind. All route causally (token t by tokens <= t of its own
sequence) except expert choice, which compares the whole group. Capacity
drops of the dispatch (`dispatch.moe_mlp`) are another dependence on the
rest of the group, for every router; dropless dispatch has none.
"""

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# exp(MASKED_LOGIT - max) underflows to exactly 0.0 in float32, and unlike
# -inf it cannot produce NaN (inf - inf) when a whole row is masked.
MASKED_LOGIT = -1e9

@flax.struct.dataclass
class RouterOutput:
  """Token-choice routing of T tokens over E experts (one group)."""
  expert_index_TxK: jax.Array      # int32 chosen experts per token
  combine_weights_TxK: jax.Array   # float32; 0.0 marks an unused slot
  router_probs_TxE: jax.Array      # float32 probabilities (metrics, balance)
  router_logits_TxE: jax.Array     # float32, masked entries = MASKED_LOGIT
  load_balance_loss: jax.Array     # scalar; 1.0 at perfect balance; 0 if N/A
  z_loss: jax.Array                # scalar mean(logsumexp(logits)^2); 0 if N/A


def router_output(index_TxK, weights_TxK, probs_TxE, logits_TxE,
                  balance_loss=0.0, z_loss=0.0) -> RouterOutput:
  """A `RouterOutput` with the contract's dtypes (used by every router)."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return RouterOutput(index_TxK.astype(jnp.int32), f32(weights_TxK),
                      f32(probs_TxE), f32(logits_TxE), f32(balance_loss),
                      f32(z_loss))


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}.')


def check_top_k(top_k: Any, num_experts: Any) -> None:
  _check_positive_int('num_experts', num_experts)
  _check_positive_int('top_k', top_k)
  if top_k > num_experts:
    raise ValueError(
        f'top_k={top_k} exceeds num_experts={num_experts}; allowed: '
        f'1 <= top_k <= num_experts.')


def allowed_mask(num_tokens: int, num_experts: int, expert_mask_TxE,
                  segment_ids_T) -> jax.Array:
  """Combines the expert mask and padding into one bool [T, E] mask."""
  allowed_TxE = jnp.ones((num_tokens, num_experts), jnp.bool_)
  if expert_mask_TxE is not None:
    if expert_mask_TxE.shape != (num_tokens, num_experts):
      raise ValueError(
          f'expert_mask_TxE has shape {expert_mask_TxE.shape}; expected '
          f'{(num_tokens, num_experts)}.')
    allowed_TxE &= expert_mask_TxE.astype(jnp.bool_)
  if segment_ids_T is not None:
    allowed_TxE &= (segment_ids_T != 0)[:, None]
  return allowed_TxE


def safe_normalize(x_TxX: jax.Array) -> jax.Array:
  """x / x.sum(-1), with all-zero rows (padding, fully masked) left at zero.

  The double `where` keeps the gradient finite: dividing by a clamped tiny
  denominator has a 0 * inf (NaN) VJP on an all-zero row.
  """
  total_Tx1 = x_TxX.sum(-1, keepdims=True)
  positive_Tx1 = total_Tx1 > 0
  return jnp.where(positive_Tx1,
                   x_TxX / jnp.where(positive_Tx1, total_Tx1, 1.0), 0.0)


def load_balance_loss(probs_TxE: jax.Array, expert_index_TxK: jax.Array,
                      combine_weights_TxK: jax.Array,
                      allowed_TxE: jax.Array | None = None) -> jax.Array:
  """Switch-Transformer auxiliary loss, normalized to 1.0 at perfect balance.

  Switch (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, f_e the fraction of
  routed (non-zero weight) slots sent to e, P_e the mean probability of e.
  Under a mask uniform use is unreachable (a partition-pure group sees only
  its own experts), so the normalizer 1/E becomes sum_e u_e^2, u_e the mean
  over tokens of the uniform distribution over the token's allowed experts.
  Without a mask this is exactly Switch's loss; with one, 1.0 again means "as
  balanced as the mask permits". Tokens with no allowed expert are ignored.
  """
  counts_E = jnp.zeros(probs_TxE.shape[-1]).at[expert_index_TxK].add(
      (combine_weights_TxK != 0).astype(jnp.float32))
  f_E = counts_E / jnp.maximum(counts_E.sum(), 1.0)
  if allowed_TxE is None:
    allowed_TxE = jnp.ones(probs_TxE.shape, jnp.bool_)
  allowed = allowed_TxE.astype(jnp.float32)
  num_allowed_T = allowed.sum(axis=-1)
  num_valid = jnp.maximum(jnp.sum(num_allowed_T > 0), 1)
  p_E = probs_TxE.sum(axis=0) / num_valid
  uniform_E = (allowed / jnp.maximum(num_allowed_T, 1.0)[:, None]).sum(0)
  ideal = jnp.sum((uniform_E / num_valid) ** 2)
  return jnp.sum(f_E * p_E) / jnp.maximum(ideal, 1e-30)


def router_z_loss(masked_logits_TxE: jax.Array,
                  allowed_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5) over routable tokens."""
  valid_T = allowed_TxE.any(axis=-1)
  lse_T = jnp.where(valid_T, jax.nn.logsumexp(masked_logits_TxE, -1), 0.0)
  return jnp.sum(lse_T ** 2) / jnp.maximum(valid_T.sum(), 1)


def _router_logits(module: nn.Module, x_TxD: jax.Array, num_experts: int,
                   use_bias: bool) -> jax.Array:
  """float32 logits x @ kernel (+ bias); kernel is [embed, unmodeled]."""
  # Switch: a 10x smaller init than usual keeps early routing near uniform.
  init = nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
  kernel = module.param(
      'kernel', nn.with_logical_partitioning(init, ('embed', 'unmodeled')),
      (x_TxD.shape[-1], num_experts), jnp.float32)
  logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), kernel,
                       precision=jax.lax.Precision.HIGHEST)
  if use_bias:
    bias = module.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ('unmodeled',)),
        (num_experts,), jnp.float32)
    logits_TxE = logits_TxE + bias
  return logits_TxE


def _masked_softmax(logits_TxE, allowed_TxE):
  masked_TxE = jnp.where(allowed_TxE, logits_TxE, MASKED_LOGIT)
  # The final `* allowed` zeroes fully masked rows (softmax would be uniform).
  probs_TxE = jax.nn.softmax(masked_TxE, axis=-1) * allowed_TxE
  return masked_TxE, probs_TxE


class TokenTopKRouter(nn.Module):
  """Token-choice top-k softmax router (GShard / Switch / ST-MoE).

  Attributes:
    num_experts: E.
    top_k: experts per token, 1 <= top_k <= E.
    renormalize: rescale the k chosen probabilities to sum to 1 (GShard); if
      False the raw probabilities are the combine weights (Switch top-1).
    jitter_noise: Switch multiplicative jitter eps: the router input is scaled
      by U(1-eps, 1+eps) when not deterministic (rng stream 'jitter').
    use_bias: add a learned bias to the logits.
  """
  num_experts: int
  top_k: int
  renormalize: bool = True
  jitter_noise: float = 0.0
  use_bias: bool = False

  def __post_init__(self):
    check_top_k(self.top_k, self.num_experts)
    if not 0.0 <= self.jitter_noise < 1.0:
      raise ValueError(f'jitter_noise={self.jitter_noise!r}; allowed: [0, 1).')
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TxD, *, token_ids_T=None, segment_ids_T=None,
               expert_mask_TxE=None, deterministic=True) -> RouterOutput:
    del token_ids_T  # Content-based routing only.
    x_TxD = x_TxD.astype(jnp.float32)
    if not deterministic and self.jitter_noise > 0:
      eps = self.jitter_noise
      x_TxD = x_TxD * jax.random.uniform(
          self.make_rng('jitter'), x_TxD.shape, jnp.float32, 1 - eps, 1 + eps)
    logits_TxE = _router_logits(self, x_TxD, self.num_experts, self.use_bias)
    allowed_TxE = allowed_mask(x_TxD.shape[0], self.num_experts,
                                expert_mask_TxE, segment_ids_T)
    masked_TxE, probs_TxE = _masked_softmax(logits_TxE, allowed_TxE)
    top_p_TxK, index_TxK = jax.lax.top_k(probs_TxE, self.top_k)
    if self.renormalize:
      top_p_TxK = safe_normalize(top_p_TxK)
    return router_output(
        index_TxK, top_p_TxK, probs_TxE, masked_TxE,
        load_balance_loss(probs_TxE, index_TxK, top_p_TxK, allowed_TxE),
        router_z_loss(masked_TxE, allowed_TxE))


class ExpertChoiceRouter(nn.Module):
  """Expert-choice routing (Zhou et al. 2022): each expert picks its tokens.

  Expert e takes the C = ceil(T * capacity_factor / E) tokens with the highest
  softmax probability for e (token-to-expert softmax, as in the paper). The
  result is token-major with K = E slots: slot e is expert e, weighted by the
  token's probability for e if e picked the token, else 0. Balanced by
  construction, so load_balance_loss = 0; z_loss is still reported.
  Disallowed and padding tokens are picked last and then carry weight 0.

  NOT causal: an expert's choice compares every token of the group, so
  whether token t is routed (and where) depends on later tokens of its own
  sequence and on the other sequences of the group. A language model's
  loss measured with it reads the future and is optimistic (Zhou et al.
  2022, "Limitations", note it does not directly apply to auto-regressive
  generation); tests/model/test_causality.py shows the dependence. Use it
  to compare training dynamics, not to report LM losses; token_topk, hash
  and sequence_gate route causally.
  """
  num_experts: int
  capacity_factor: float = 1.0
  use_bias: bool = False

  def __post_init__(self):
    _check_positive_int('num_experts', self.num_experts)
    if not self.capacity_factor > 0:
      raise ValueError(
          f'capacity_factor={self.capacity_factor!r}; allowed: > 0.')
    super().__post_init__()

  def capacity(self, num_tokens: int) -> int:
    c = math.ceil(num_tokens * self.capacity_factor / self.num_experts)
    return max(1, min(num_tokens, c))

  @nn.compact
  def __call__(self, x_TxD, *, token_ids_T=None, segment_ids_T=None,
               expert_mask_TxE=None, deterministic=True) -> RouterOutput:
    del token_ids_T, deterministic
    num_tokens, num_experts = x_TxD.shape[0], self.num_experts
    logits_TxE = _router_logits(self, x_TxD, num_experts, self.use_bias)
    allowed_TxE = allowed_mask(num_tokens, num_experts, expert_mask_TxE,
                                segment_ids_T)
    masked_TxE, probs_TxE = _masked_softmax(logits_TxE, allowed_TxE)
    scores_ExT = jnp.where(allowed_TxE.T, probs_TxE.T, -1.0)
    top_ExC, token_ExC = jax.lax.top_k(scores_ExT, self.capacity(num_tokens))
    expert_ExC = jnp.broadcast_to(
        jnp.arange(num_experts)[:, None], token_ExC.shape)
    weights_TxE = jnp.zeros((num_tokens, num_experts), jnp.float32).at[
        token_ExC, expert_ExC].set(jnp.maximum(top_ExC, 0.0),
                                   unique_indices=True)
    index_TxE = jnp.broadcast_to(jnp.arange(num_experts), weights_TxE.shape)
    return router_output(index_TxE, weights_TxE, probs_TxE, masked_TxE,
                   z_loss=router_z_loss(masked_TxE, allowed_TxE))


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3 32-bit finalizer: a cheap, well-mixing integer hash."""
  for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
  return h ^ (h >> 16)


def hash_scores(token_ids_T: jax.Array, num_experts: int,
                seed: int) -> jax.Array:
  """Fixed pseudo-random int32 score >= 0 for every (token id, expert).

  A stateless hash instead of a stored [vocab, E] table: same semantics (a
  constant of the seed, not a parameter) without an 8 MB constant in HLO.
  """
  ids = token_ids_T.astype(jnp.uint32)[:, None] * jnp.uint32(num_experts)
  keys = ids + jnp.arange(num_experts, dtype=jnp.uint32)[None, :]
  keys = keys ^ jnp.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)
  return (_fmix32(_fmix32(keys)) >> 1).astype(jnp.int32)


def hash_expert_table(vocab_size: int, num_experts: int, top_k: int = 1,
                      seed: int = 0) -> jax.Array:
  """The full token-id -> experts table [vocab_size, top_k] (for analysis)."""
  scores_VxE = hash_scores(jnp.arange(vocab_size), num_experts, seed)
  return jax.lax.top_k(scores_VxE, top_k)[1].astype(jnp.int32)


class HashRouter(nn.Module):
  """Hash layer routing (Roller et al. 2021): fixed token id -> experts.

  Each token id goes to the top_k experts of a fixed random score (a function
  of seed only; no parameters), each with weight 1/top_k (1.0 for the default
  top_k=1). Under an expert mask the same ranking is restricted to the allowed
  experts, so a token id still always lands on the same allowed experts.
  """
  num_experts: int
  vocab_size: int
  top_k: int = 1
  seed: int = 0

  def __post_init__(self):
    check_top_k(self.top_k, self.num_experts)
    _check_positive_int('vocab_size', self.vocab_size)
    super().__post_init__()

  def __call__(self, x_TxD, *, token_ids_T=None, segment_ids_T=None,
               expert_mask_TxE=None, deterministic=True) -> RouterOutput:
    del deterministic
    if token_ids_T is None:
      raise ValueError('HashRouter needs token_ids_T (got None).')
    num_tokens, num_experts = x_TxD.shape[0], self.num_experts
    allowed_TxE = allowed_mask(num_tokens, num_experts, expert_mask_TxE,
                                segment_ids_T)
    scores_TxE = jnp.where(
        allowed_TxE, hash_scores(token_ids_T, num_experts, self.seed), -1)
    top_TxK, index_TxK = jax.lax.top_k(scores_TxE, self.top_k)
    weights_TxK = jnp.where(top_TxK >= 0, 1.0 / self.top_k, 0.0)
    probs_TxE = jnp.zeros((num_tokens, num_experts), jnp.float32).at[
        jnp.arange(num_tokens)[:, None], index_TxK].add(weights_TxK)
    return router_output(index_TxK, weights_TxK, probs_TxE,
                   jnp.where(allowed_TxE, 0.0, MASKED_LOGIT))
