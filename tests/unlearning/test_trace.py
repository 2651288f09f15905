"""Tests for tiered_routing.unlearning.trace (TRACE reweighting)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.model import routing_capture
from tiered_routing.tier1 import layout
from tiered_routing.unlearning import expert_attribution as ea
from tiered_routing.unlearning import objectives as obj
from tiered_routing.unlearning import trace

P, B, L, E = 2, 2, 6, 4  # The conftest's tiny model.


def _check_calibrated(w, hits, mask, f_forget):
  w, hits, mask = map(np.asarray, (w, hits, mask))
  np.testing.assert_allclose(w[mask].mean(), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(w[~mask], 0.0)
  np.testing.assert_allclose(
      (w * hits)[mask].sum() / w[mask].sum(), f_forget, rtol=1e-5
  )


def test_weights_golden():
  hits = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
  mask = np.array([1] * 10 + [0], bool)  # The last token is padding.
  w, m = trace.retain_token_weights(hits, mask, 0.5)
  # f_retain = 0.2 -> r = 2.5, s = (1 - 0.5) / 0.8 = 0.625.
  np.testing.assert_allclose(w, [2.5, 2.5] + [0.625] * 8 + [0.0], rtol=1e-6)
  np.testing.assert_allclose(m["trace_retain_frequency"], 0.2)
  np.testing.assert_allclose(
      m["trace_weighted_retain_frequency"], 0.5, rtol=1e-6
  )
  _check_calibrated(w, hits, mask, 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_frequency_matches_forget_frequency(seed):
  rng = np.random.default_rng(seed)
  hits = rng.random(200) < rng.uniform(0.05, 0.5)
  mask = rng.random(200) < 0.9
  f_forget = rng.uniform(0.05, 0.95)
  f_retain = hits[mask].mean()
  assert 0.1 <= f_forget / f_retain <= 10  # inside the clip range
  w, _ = trace.retain_token_weights(hits, mask, f_forget, 0.1, 10.0)
  _check_calibrated(w, hits, mask, f_forget)


def test_clipping_keeps_mean_one():
  hits = np.arange(100) < 5  # f_retain = 0.05
  mask = np.ones(100, bool)
  w, m = trace.retain_token_weights(hits, mask, 0.9, w_min=0.1, w_max=10.0)
  np.testing.assert_allclose(m["trace_hit_weight"], 10.0)
  np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      m["trace_weighted_retain_frequency"], 0.5, rtol=1e-6
  )
  w, m = trace.retain_token_weights(np.arange(100) < 50, mask, 0.01, w_min=0.1)
  np.testing.assert_allclose(
      m["trace_weighted_retain_frequency"], 0.05, rtol=1e-5
  )
  np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-6)
  # r is also capped at 1 / f_retain so the other tokens' weight stays >= 0.
  w, m = trace.retain_token_weights(np.arange(100) < 80, mask, 0.5, w_min=0.9)
  assert float(np.min(w)) >= 0.0
  np.testing.assert_allclose(np.mean(w), 1.0, rtol=1e-6)


def test_no_or_all_hits_gives_unit_weights():
  mask = np.array([1, 1, 1, 0], bool)
  for hits in (np.zeros(4, bool), np.ones(4, bool)):
    w, _ = trace.retain_token_weights(hits, mask, 0.7)
    np.testing.assert_array_equal(w, [1, 1, 1, 0])
  with pytest.raises(ValueError, match="w_min=2"):
    trace.retain_token_weights(mask, mask, 0.5, w_min=2.0)


def _routing(idx, w):
  return routing_capture.TokenRouting(
      jnp.array(idx),
      jnp.array(w, jnp.float32),
      tuple(f"l{i}" for i in range(len(idx))),
  )


def test_critical_hits_golden():
  # 2 layers, 3 tokens (partitions 0, 0, 1), top-2 over 3 experts.
  routing = _routing(
      [[[0, 1], [1, 2], [2, 0]], [[1, 2], [2, 1], [0, 1]]],
      [
          [[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]],
          [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],
      ],
  )
  pid = jnp.array([0, 0, 1])
  # Expert 2 of layer 0 is critical for partition 0 only.
  crit = np.zeros((2, 2, 3), bool)
  crit[0, 0, 2] = True
  # Token 0: layer 1 uses e2 but only layer 0's e2 is critical -> no hit.
  # Token 1: layer 0 slot with e2 has weight 0 -> no hit.
  # Token 2: partition 1, where nothing is critical -> no hit.
  np.testing.assert_array_equal(
      trace.critical_hits(routing, crit, pid), [False, False, False]
  )
  crit[1, 0, 2] = True
  np.testing.assert_array_equal(
      trace.critical_hits(routing, crit, pid), [True, True, False]
  )
  crit[:, 1, 0] = True
  np.testing.assert_array_equal(
      trace.critical_hits(routing, crit, pid), [True, True, True]
  )
  hits = trace.critical_hits(routing, np.zeros((2, 2, 3), bool), pid)
  w, _ = trace.retain_token_weights(hits, np.ones(3, bool), 0.4)
  np.testing.assert_array_equal(w, 1.0)  # no critical experts
  with pytest.raises(ValueError, match=r"\[M=2, P, E\]"):
    trace.critical_hits(routing, crit[0], pid)


def test_trace_loss_reweights_the_retain_nll():
  forget = obj.TokenLogProbs(jnp.array([[-1.0, -3.0]]), jnp.ones((1, 2)))
  retain = obj.TokenLogProbs(
      jnp.array([[-1.0, -2.0, -4.0, -9.0]]), jnp.array([[1.0, 1.0, 1.0, 0.0]])
  )
  hits = jnp.array([True, False, False, True])
  cfg = trace.TraceConfig("ga", forget_coeff=1.0, retain_coeff=2.0)
  loss, m = trace.trace_loss(cfg, forget, retain, hits, 2 / 3)
  # f_retain = 1/3 -> r = 2, s = (1 - 2/3) / (2/3) = 0.5; weights 2, .5, .5.
  retain_nll = (2 * 1 + 0.5 * 2 + 0.5 * 4) / 3
  np.testing.assert_allclose(m["retain_nll"], retain_nll, rtol=1e-6)
  np.testing.assert_allclose(loss, -2.0 + 2 * retain_nll, rtol=1e-6)
  np.testing.assert_allclose(
      m["trace_weighted_retain_frequency"], 2 / 3, rtol=1e-6
  )
  with pytest.raises(ValueError, match=r"expected \(4,\)"):
    trace.trace_loss(cfg, forget, retain, hits[:3], 0.5)


def test_trace_config_validation():
  with pytest.raises(ValueError, match="'graddiff'"):
    trace.TraceConfig("graddiff")
  with pytest.raises(ValueError, match="retain_coeff=0"):
    trace.TraceConfig(retain_coeff=0)
  with pytest.raises(ValueError, match="w_max=0.5"):
    trace.TraceConfig(w_max=0.5)
  with pytest.raises(ValueError, match="npo_beta=-1"):
    trace.TraceConfig(npo_beta=-1)
  assert trace.TraceConfig("ga").objective_config().name == "graddiff"


def _mixed_batch():
  """Forget and retain rows in one [P, 2B, L] batch (one forward pass).

  They are told apart by complementary weights: forget = rows b < B of
  partition 0, retain = rows b >= B of every partition.
  """
  tokens = jax.random.randint(jax.random.PRNGKey(5), (P, 2 * B, L), 1, 32)
  rows = jnp.arange(2 * B)[None, :, None]
  in_p0 = jnp.arange(P)[:, None, None] == 0
  forget_w = jnp.broadcast_to((rows < B) & in_p0, tokens.shape)
  retain_w = jnp.broadcast_to(rows >= B, tokens.shape)
  seg = (forget_w | retain_w).astype(jnp.int32)
  return tokens, forget_w.astype(jnp.float32), retain_w.astype(jnp.float32), seg


def _attribute(route, forget_w, retain_w, pid):
  """Attribution from forget vs retain routing in partition 0."""
  is_forget = np.asarray(forget_w).reshape(-1) > 0
  is_retain_p0 = (np.asarray(retain_w).reshape(-1) > 0) & (np.asarray(pid) == 0)
  f_counts, n_f = ea.routing_counts(route, E, is_forget)
  r_counts, n_r = ea.routing_counts(route, E, is_retain_p0)
  crit, _ = ea.critical_experts(
      np.asarray(f_counts / n_f), np.asarray(r_counts / n_r)
  )
  critical = ~ea.router_mask(crit, P, partitions=[0])
  f_forget = trace.activation_frequency(
      trace.critical_hits(route, critical, pid), is_forget
  )
  return jnp.asarray(critical), f_forget


def test_trace_step_through_the_model(tiny_model):
  """A TRACE gradient step on a real decoder raises the forget loss."""
  tiny = tiny_model("none")
  tokens, forget_w, retain_w, seg = _mixed_batch()
  pid = layout.token_partition_ids(tokens.shape)
  cfg = trace.TraceConfig("ga", retain_coeff=0.1)

  def loss_fn(params, critical, f_forget):
    logits, routing, _ = tiny.routed_forward(
        params, {"decoder_input_tokens": tokens, "decoder_segment_ids": seg}
    )
    logp = obj.token_log_likelihood(logits, tokens)
    hits = trace.critical_hits(routing, critical, pid)
    forget = obj.TokenLogProbs(logp, forget_w)
    retain = obj.TokenLogProbs(logp, retain_w)
    loss, metrics = trace.trace_loss(cfg, forget, retain, hits, f_forget)
    return loss, (metrics, routing)

  # One compiled function serves the statistics pass and both steps.
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  params = tiny.variables["params"]
  no_critical = jnp.zeros((2, P, E), bool)
  (_, (m0, route)), _ = value_and_grad(params, no_critical, 0.5)
  assert float(m0["trace_hit_weight"]) == 1.0  # nothing to reweight
  critical, f_forget = _attribute(route, forget_w, retain_w, pid)
  assert 0 < float(f_forget) <= 1
  (loss, (m, _)), grads = value_and_grad(params, critical, f_forget)
  assert np.isfinite(float(loss))
  assert 0 < float(m["trace_retain_frequency"]) < 1
  np.testing.assert_allclose(
      m["trace_weighted_retain_frequency"],
      m["trace_hit_weight"] * m["trace_retain_frequency"],
      rtol=1e-5,
  )
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  (_, (m2, _)), _ = value_and_grad(stepped, critical, f_forget)
  assert float(m2["forget_nll"]) > float(m["forget_nll"])
