"""Generation: greedy equals step-by-step argmax; sampling is controlled."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.eval import decoding

P, V, N = 2, 32, 5
BASE = decoder_config.DecoderConfig(
    vocab_size=V,
    d_model=16,
    num_heads=2,
    head_dim=8,
    num_layers=2,
    d_ff=16,
    num_experts=4,
    expert_d_ff=8,
    top_k=2,
    moe_every=2,
    num_partitions=P,
    sharing="none",
    group_size=64,
    dispatch="reference",
)


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  # See tests/unlearning/conftest.py: partitionable threefry compiles slowly
  # on XLA:CPU and nothing here needs sharding-invariant draws.
  with jax.threefry_partitionable(False):
    yield


def _random_params(config):
  """Params of the config's shapes, drawn with numpy (no init compile)."""
  model = transformer.TieredDecoder(config)
  abstract = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((P, 1, 8), jnp.int32)
  )["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: rng.normal(0.0, 0.5, x.value.shape).astype(np.float32),
      abstract,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  return model, params


@pytest.fixture(scope="module", params=["none", "attention"])
def setup(request):
  config = dataclasses.replace(BASE, sharing=request.param)
  return (config,) + _random_params(config)


def _reference_argmax(model, params, prompts, generated, partition):
  """Argmax of the model's logits after each prefix, from one causal apply.

  The model is causal (token-choice router, dropless dispatch), so the
  logits at position t of a whole sequence are those of the prefix ending
  at t, whatever follows (here: zero padding of the shorter rows): greedy
  decoding must pick exactly these tokens.
  """
  rows = [
      [decoding.BOS_ID] + list(p) + list(g)
      for p, g in zip(prompts, generated)
  ]
  width = max(map(len, rows))
  tokens = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    tokens[b, : len(row)] = row
  # Every partition's block holds the rows: no partition is empty.
  logits = jax.jit(model.apply)(
      {"params": params}, jnp.asarray(np.stack([tokens] * P))
  )[partition]
  n = len(generated[0])
  return [  # position len(prompt) predicts the first new token (BOS shift)
      np.argmax(logits[b, len(p) : len(p) + n], axis=-1).tolist()
      for b, p in enumerate(prompts)
  ]


def test_greedy_matches_reference_and_batching(setup):
  config, model, params = setup
  gen = decoding.Generator(config, params, partition=1)
  greedy = decoding.SamplingConfig(max_new_tokens=N)
  prompts = [[5, 9, 3], [7]]
  got = gen.generate(prompts, greedy)
  assert got.shape == (2, N) and got.dtype == np.int32
  assert got.tolist() == _reference_argmax(model, params, prompts, got, 1)
  # A row's tokens do not depend on the other rows (dropless dispatch).
  swapped = gen.generate([[7], [2, 2, 2, 2]], greedy)
  assert swapped[0].tolist() == got[1].tolist()


def test_sampling_controls():
  _, params = _random_params(BASE)
  config = BASE
  gen = decoding.Generator(config, params, partition=0)
  prompts = [[4, 11], [6]]  # two rows, as above: the step is compiled once
  sample = lambda **kw: gen.generate(
      prompts, decoding.SamplingConfig(max_new_tokens=N, **kw)
  ).tolist()
  greedy = sample()
  assert sample(temperature=1e-6, seed=1) == greedy
  assert sample(temperature=5.0, top_k=1, seed=2) == greedy
  hot = sample(temperature=2.0, seed=3)
  assert sample(temperature=2.0, seed=3) == hot
  assert sample(temperature=2.0, seed=4) != hot


def test_choose_top_k_keeps_only_the_k_likeliest():
  logits = jnp.tile(jnp.array([[0.0, 1.0, 2.0, 3.0]]), (4000, 1))
  draws = jax.jit(decoding.choose)(
      logits, jax.random.PRNGKey(0), jnp.float32(1.0), jnp.int32(2)
  )
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts[:2].sum() == 0
  # p(3) / p(2) = e under temperature 1.
  assert counts[3] / counts[2] == pytest.approx(np.e, rel=0.15)


def test_bad_arguments():
  _, params = _random_params(BASE)
  config = BASE
  with pytest.raises(ValueError, match=r"partition=2; allowed: an int 0..1"):
    decoding.Generator(config, params, partition=2)
  with pytest.raises(ValueError, match=r"temperature=-1.0; allowed"):
    decoding.SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match=r"max_new_tokens=0; allowed"):
    decoding.SamplingConfig(max_new_tokens=0)
  gen = decoding.Generator(config, params, partition=0)
  ok = decoding.SamplingConfig(max_new_tokens=1)
  with pytest.raises(ValueError, match=r"token id 32 .*allowed: 0..31"):
    gen.generate([[1, 32]], ok)
  with pytest.raises(ValueError, match="non-empty list"):
    gen.generate([], ok)
  with pytest.raises(ValueError, match=r"top_k=33; allowed: 0..32"):
    gen.generate([[1]], decoding.SamplingConfig(top_k=33))


def test_truncate_at_eos():
  assert decoding.truncate_at_eos([5, 1, 7], eos_id=1) == [5]
  assert decoding.truncate_at_eos([5, 7], eos_id=1) == [5, 7]
