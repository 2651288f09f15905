"""Tests for tiered_routing.moefication."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import decoder_config
from tiered_routing.model import layers
from tiered_routing.model import transformer
from tiered_routing.related import moefication
from tiered_routing.related import moefied_decoder
from tiered_routing.train import train_state

D, F, N = 8, 32, 4


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_rng_compile():
  with jax.threefry_partitionable(False):
    yield


def _mlp(gated=True, activation="gelu", seed=0):
  module = layers.Mlp(F, gated=gated, activation=activation)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (64, D))
  params = train_state._strip_boxes(
      module.init(jax.random.PRNGKey(seed), x)["params"]
  )
  return module, params, x


def _same_partition(a, b):
  """Whether two labelings group the points identically."""
  a, b = np.asarray(a), np.asarray(b)
  return (a[:, None] == a[None]).tolist() == (b[:, None] == b[None]).tolist()


def test_balanced_kmeans_recovers_planted_equal_clusters():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(N, 6)) * 10
  planted = rng.permutation(np.repeat(np.arange(N), F // N))
  points = centers[planted] + rng.normal(size=(F, 6)) * 0.1
  labels = moefication.balanced_kmeans(points, N, seed=3)
  assert _same_partition(labels, planted)
  # Random points have no structure; sizes are still exactly F / N.
  labels = moefication.balanced_kmeans(rng.normal(size=(F, 6)), N)
  np.testing.assert_array_equal(np.bincount(labels, minlength=N), [F // N] * N)
  with pytest.raises(ValueError, match="divide"):
    moefication.balanced_kmeans(points, 5)


def test_balanced_assignment_beats_greedy_under_the_size_constraint():
  # All points prefer cluster 0; each cluster must take exactly two.
  dist = np.array([[0.0, 5.0], [0.0, 1.0], [0.0, 9.0], [0.0, 2.0]])
  np.testing.assert_array_equal(
      moefication.balanced_assignment(dist), [0, 1, 0, 1]
  )


@pytest.mark.parametrize("gated,activation", [(True, "gelu"), (False, "relu")])
def test_permutation_and_all_experts_reproduce_the_dense_layer(
    gated, activation
):
  module, params, x = _mlp(gated, activation)
  dense = module.apply({"params": params}, x)
  config = moefication.MoeficationConfig(num_experts=N)
  permuted, labels = moefication.moefy_mlp(params, config)
  np.testing.assert_array_equal(np.bincount(labels), [F // N] * N)
  np.testing.assert_allclose(
      module.apply({"params": permuted}, x), dense, rtol=1e-5, atol=1e-5
  )
  experts = moefication.split_experts(permuted, N)
  assert experts["wi"].shape == (N, D, F // N)
  assert experts["wo"].shape == (N, F // N, D)
  assert ("wi_gate" in experts) == gated
  np.testing.assert_allclose(
      moefication.moe_ffn(x, experts, N, activation=activation),
      dense,
      rtol=1e-5,
      atol=1e-5,
  )
  # Expert e holds exactly the units labelled e, in their original order.
  for e in range(N):
    np.testing.assert_array_equal(
        experts["wi"][e], params["wi"][:, labels == e]
    )


def test_top_k_keeps_the_units_of_the_best_clusters():
  module, params, x = _mlp()
  experts = moefication.split_experts(params, N)  # Any contiguous split.
  h = moefication.expert_hidden(x, experts)
  for score in moefication.SCORES:
    scores = np.asarray(moefication.partition_scores(h, score))
    best = scores.argmax(-1)
    keep = np.zeros((x.shape[0], F), np.float32)
    for t, e in enumerate(best):
      keep[t, e * (F // N) : (e + 1) * (F // N)] = 1.0
    wi, wg, wo = (np.asarray(params[k]) for k in ("wi", "wi_gate", "wo"))
    xa = np.asarray(x, np.float64)
    hidden = np.asarray(jax.nn.gelu(xa @ wi)) * (xa @ wg)
    expected = (hidden * keep) @ wo
    np.testing.assert_allclose(
        moefication.moe_ffn(x, experts, 1, score=score),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )
  positive = moefication.partition_scores(jnp.array([[[1.0, -2.0, 3.0]]]))
  absolute = moefication.partition_scores(
      jnp.array([[[1.0, -2.0, 3.0]]]), "abs"
  )
  np.testing.assert_allclose([positive[0, 0], absolute[0, 0]], [4.0, 6.0])


def test_fit_router_recovers_a_linear_map():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, D))
  w, b = rng.normal(size=(D, N)), rng.normal(size=N)
  router = moefication.fit_router(x, x @ w + b, l2=1e-9)
  np.testing.assert_allclose(router["kernel"], w, atol=1e-4)
  np.testing.assert_allclose(router["bias"], b, atol=1e-4)


def test_moefied_decoder_matches_dense_at_k_equal_n():
  config = decoder_config.DecoderConfig(
      vocab_size=32,
      d_model=D,
      num_heads=2,
      head_dim=4,
      num_layers=2,
      d_ff=F,
      num_experts=0,
      num_partitions=2,
      sharing="none",
  )
  model = transformer.TieredDecoder(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 4, 8), 1, 32)
  params = train_state._strip_boxes(
      jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  )
  moefied = moefied_decoder.moefy_params(
      params, moefication.MoeficationConfig(N)
  )
  # Partition-private FFNs are clustered separately.
  assert moefied["decoder"]["layers_0"]["mlp"]["wi"].shape == (2, D, F)
  batch = {
      "decoder_input_tokens": np.asarray(tokens),
      "decoder_loss_weights": np.ones(tokens.shape, np.float32),
  }
  inputs = moefied_decoder.collect_mlp_inputs(model, moefied, [batch])
  assert inputs[("decoder", "layers_1", "mlp")].shape == (2, 32, D)
  routed = moefied_decoder.fit_routers(moefied, inputs, N)
  assert routed["decoder"]["layers_0"]["mlp"][moefied_decoder.ROUTER_NAME][
      "kernel"
  ].shape == (2, D, N)

  def logits(params, top_k, routing):
    with moefied_decoder.moefied(N, top_k, routing=routing):
      return model.apply({"params": params}, tokens)

  run = jax.jit(logits, static_argnums=(1, 2))
  plain = jax.jit(lambda p: model.apply({"params": p}, tokens))
  dense = plain(params)
  np.testing.assert_allclose(plain(moefied), dense, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      run(moefied, N, "oracle"), dense, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
      run(routed, N, "learned"), dense, rtol=1e-4, atol=1e-4
  )
  sparse = run(routed, 1, "learned")
  assert np.isfinite(sparse).all()
  assert np.abs(sparse - dense).max() > 1e-3
  with pytest.raises(ValueError, match="fit_routers"):
    run(moefied, 1, "learned")
