"""Text generation from one tier-1 partition of a `TieredDecoder`.

For a quick look at what a partition learned: greedy decoding, or sampling
with a temperature and an optional top-k filter (Fan et al. 2018).

Decoding recomputes the whole sequence at every step, on a buffer of fixed
length so that one jitted step serves every step (and every temperature,
top-k and seed: they are traced values). Positions not yet generated carry
segment id 0, i.e. padding: attention never reads them and routers send
them nowhere, so they take no expert capacity. Full recomputation is also
what keeps the result exact where routing is not causal (expert choice
picks tokens by comparing the whole group, and a capacity-limited dispatch
drops tokens by comparing it): every step routes exactly the current
prefix, as the model does when it is applied to that prefix alone. A key-value cache would reuse
routing decisions made for shorter prefixes.

Rows of one call are batched; note that a capacity-limited dispatch lets
rows of one routing group compete for expert capacity, as in training.
Layout: the prompt rows fill block `partition` of a `[P, B, L]` batch; under
sharing 'none' the partition's parameters alone are run as a one-partition
model (the other partitions cannot influence it).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.model import decoder_config
from tiered_routing.model import forward as forward_lib
from tiered_routing.model import transformer
from tiered_routing.tier1 import one_partition

BOS_ID = 0  # SeqIO's decoder-only inputs start with token 0.
_BUFFER_MULTIPLE = 32  # Buffer lengths are rounded up: fewer recompiles.


def _check_int(name: str, value: Any, low: int, high: int | None = None):
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    allowed = f"{low}..{high}" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value!r}; allowed: an int {allowed}.")


def _step(
    params,
    tokens_BxL,
    length_B,
    rng,
    temperature,
    top_k,
    block,
    expert_mask_MxPxE=None,
    *,
    model,
    num_partitions,
):
  """Chooses the next token of every row and writes it into the buffer.

  Args:
    params: the decoder's params.
    tokens_BxL: the buffer; row b holds length_B[b] tokens.
    length_B: int32 tokens per row so far (>= 1).
    rng: the step's key.
    temperature: float32 scalar; 0 = greedy.
    top_k: int32 scalar; sample among the k likeliest tokens (0 = all).
    block: int32 scalar; the partition block of the batch the rows fill.
    expert_mask_MxPxE: optional per-layer expert mask (`forward.forward`).

  Returns:
    (new buffer, new lengths, chosen token per row).
  """
  b, l = tokens_BxL.shape
  segment_BxL = (jnp.arange(l)[None, :] < length_B[:, None]).astype(jnp.int32)
  positions_BxL = segment_BxL * jnp.arange(l, dtype=jnp.int32)[None, :]
  place = lambda x: jax.lax.dynamic_update_index_in_dim(
      jnp.zeros((num_partitions, b, l), x.dtype), x, block, 0
  )
  batch = {
      "decoder_input_tokens": place(tokens_BxL),
      "decoder_segment_ids": place(segment_BxL),
      "decoder_positions": place(positions_BxL),
  }
  logits_PxBxLxV = forward_lib.forward(
      model, params, batch, expert_mask_MxPxE=expert_mask_MxPxE
  ).logits_PxBxLxV
  logits_BxLxV = jax.lax.dynamic_index_in_dim(
      logits_PxBxLxV, block, 0, keepdims=False
  )
  logits_BxV = logits_BxLxV[jnp.arange(b), length_B - 1]
  token_B = choose(logits_BxV, rng, temperature, top_k)
  tokens_BxL = tokens_BxL.at[jnp.arange(b), length_B].set(token_B)
  return tokens_BxL, length_B + 1, token_B


def choose(logits_BxV, rng, temperature, top_k) -> jax.Array:
  """Greedy (temperature 0) or temperature / top-k sampling, int32 [B]."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  vocab = logits_BxV.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_Bx1 = jnp.sort(logits_BxV, axis=-1)[:, vocab - k][:, None]
  kept_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  safe_t = jnp.where(temperature > 0, temperature, 1.0)
  sampled_B = jax.random.categorical(rng, kept_BxV / safe_t, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _jitted_step(config: decoder_config.DecoderConfig):
  """One jitted `_step` per model config, shared by every `Generator`."""
  return jax.jit(
      functools.partial(
          _step,
          model=transformer.TieredDecoder(config),
          num_partitions=config.num_partitions,
      )
  )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen.

  Attributes:
    max_new_tokens: tokens generated per prompt.
    temperature: 0 = greedy; else logits / temperature are sampled.
    top_k: sample among the k likeliest tokens only; 0 = no filter.
    seed: the sampling seed (step s uses fold_in(key(seed), s)).
  """

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  seed: int = 0

  def __post_init__(self):
    _check_int("max_new_tokens", self.max_new_tokens, 1)
    _check_int("top_k", self.top_k, 0)
    _check_int("seed", self.seed, 0)
    t = self.temperature
    if (
        isinstance(t, bool)
        or not isinstance(t, (int, float))
        or not (0.0 <= t < float("inf"))
    ):
      raise ValueError(
          f"temperature={t!r}; allowed: a finite number >= 0 (0 = greedy)."
      )


class Generator:
  """Decodes from one partition of a model with given params.

  Args:
    config: the model.
    params: its params (all partitions), e.g. from
      `train.restore.restore_params`.
    partition: the tier-1 partition to run, 0..P-1.
    expert_mask_MxPxE: bool [M, P, E], experts allowed per MoE layer (e.g.
      the mask unlearning method's); None = all.
  """

  def __init__(
      self,
      config: decoder_config.DecoderConfig,
      params: Any,
      partition: int,
      expert_mask_MxPxE: Any = None,
  ):
    _check_int("partition", partition, 0, config.num_partitions - 1)
    self.partition = partition
    mask = expert_mask_MxPxE
    if config.sharing == "none":
      # The partition is an independent model: run it alone.
      params = one_partition.partition_params(params, partition)
      config = one_partition.one_partition_config(config)
      block = 0
      if mask is not None:
        mask = jnp.asarray(mask)[:, partition : partition + 1]
    else:
      block = partition
    self.config, self.params, self._block = config, params, jnp.int32(block)
    self._mask = None if mask is None else jnp.asarray(mask, bool)
    self._step = _jitted_step(config)

  def _buffer(self, prompts, max_new_tokens):
    """[B, L] buffer: BOS, the prompt, room for max_new_tokens; lengths."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
      raise ValueError(
          f"prompts={prompts!r}; allowed: a non-empty list of token-id lists."
      )
    vocab = self.config.vocab_size
    rows = [[int(t) for t in p] for p in prompts]
    for row in rows:
      bad = [t for t in row if not 0 <= t < vocab]
      if bad:
        raise ValueError(
            f"token id {bad[0]} in a prompt; allowed: 0..{vocab - 1}."
        )
    need = 1 + max(map(len, rows)) + max_new_tokens
    length = -(-need // _BUFFER_MULTIPLE) * _BUFFER_MULTIPLE
    tokens_BxL = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
      tokens_BxL[b, 1 : 1 + len(row)] = row
    tokens_BxL[:, 0] = BOS_ID
    return tokens_BxL, np.array([1 + len(r) for r in rows], np.int32)

  def generate(
      self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig
  ) -> np.ndarray:
    """Generates `sampling.max_new_tokens` tokens after every prompt.

    Args:
      prompts: token ids per row (without BOS; may differ in length, may be
        empty).
      sampling: how to choose tokens.

    Returns:
      int32 [B, max_new_tokens]: the generated ids (EOS is not special).
    """
    if sampling.top_k > self.config.vocab_size:
      raise ValueError(
          f"top_k={sampling.top_k}; allowed: 0..{self.config.vocab_size} "
          "(the vocabulary size; 0 = no filter)."
      )
    tokens, length = self._buffer(prompts, sampling.max_new_tokens)
    tokens, length = jnp.asarray(tokens), jnp.asarray(length)
    key = jax.random.key(sampling.seed)
    temperature = jnp.float32(sampling.temperature)
    top_k = jnp.int32(sampling.top_k)
    out = []
    for s in range(sampling.max_new_tokens):
      tokens, length, token = self._step(
          self.params,
          tokens,
          length,
          jax.random.fold_in(key, s),
          temperature,
          top_k,
          self._block,
          self._mask,
      )
      out.append(token)
    return np.asarray(jax.device_get(jnp.stack(out, axis=1)))


def truncate_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  """The ids before the first EOS (all of them if there is none)."""
  ids = [int(t) for t in ids]
  return ids[: ids.index(eos_id)] if eos_id in ids else ids
