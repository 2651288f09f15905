"""Tests for tiered_routing.unlearning.objectives (GA, GradDiff, NPO)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.unlearning import objectives as obj

TLP = obj.TokenLogProbs


def test_token_log_likelihood_golden():
  # p = softmax([0, log 3]) = [1/4, 3/4].
  logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
  logp = obj.token_log_likelihood(logits, jnp.array([[1, 0]]))
  np.testing.assert_allclose(
      logp, [[math.log(0.75), math.log(0.25)]], rtol=1e-6
  )


def test_mean_nll_and_ga_golden():
  logp = jnp.array([[-1.0, -2.0, -3.0]])
  w = jnp.array([[1.0, 1.0, 0.0]])
  np.testing.assert_allclose(obj.mean_nll(logp, w), 1.5)
  loss, m = obj.gradient_ascent(TLP(logp, w))
  np.testing.assert_allclose(loss, -1.5)
  np.testing.assert_allclose(m["forget_nll"], 1.5)
  # Weighted tokens count in proportion to their weight.
  np.testing.assert_allclose(obj.mean_nll(logp, jnp.array([[3.0, 1, 0]])), 1.25)


def test_graddiff_golden():
  forget = TLP(jnp.array([[-1.0, -3.0]]), jnp.ones((1, 2)))
  retain = TLP(jnp.array([[-0.5, -1.5, -1.0]]), jnp.array([[1.0, 0, 1]]))
  cfg = obj.ObjectiveConfig("graddiff", forget_coeff=2.0, retain_coeff=0.5)
  loss, m = obj.unlearning_loss(cfg, forget, retain)
  # 2 * (-2) + 0.5 * 0.75.
  np.testing.assert_allclose(loss, -3.625)
  np.testing.assert_allclose(m["retain_nll"], 0.75)
  np.testing.assert_allclose(m["forget_loss"], -2.0)
  # Default retain coefficient of graddiff is 1.
  loss, _ = obj.unlearning_loss(obj.ObjectiveConfig("graddiff"), forget, retain)
  np.testing.assert_allclose(loss, -2.0 + 0.75)


def test_sequence_log_likelihood_rows_and_segments():
  logp = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
  w = jnp.array([[1.0, 1, 1, 0], [1, 0, 1, 1]])
  seq, mask = obj.sequence_log_likelihood(TLP(logp, w))
  np.testing.assert_allclose(seq, [-6.0, -3.0])
  np.testing.assert_array_equal(mask, [True, True])
  seg = jnp.array([[1, 1, 2, 0], [1, 1, 1, 1]])
  seq, mask = obj.sequence_log_likelihood(TLP(logp, w, seg))
  assert seq.shape == (8,)
  got = {int(i): float(seq[i]) for i in np.flatnonzero(mask)}
  assert got == {0: -3.0, 1: -3.0, 4: -3.0}


def test_npo_golden():
  seq = jnp.array([-2.0, -5.0])
  ref = jnp.array([-3.0, -5.0])
  loss, m = obj.npo_from_sequences(seq, ref, jnp.array([True, True]), 0.5)
  # r = [1, 0]; (2 / 0.5) * mean(log(1 + e^{0.5 r})).
  want = 4.0 * (math.log1p(math.exp(0.5)) + math.log(2.0)) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(loss, 3.3344493, rtol=1e-6)
  np.testing.assert_allclose(m["npo_log_ratio"], 0.5)
  sig = 1 / (1 + math.exp(-0.5))
  np.testing.assert_allclose(m["npo_weight"], (2 * sig + 1.0) / 2, rtol=1e-6)
  # Masked sequences do not count.
  loss_masked, _ = obj.npo_from_sequences(
      seq, ref, jnp.array([True, False]), 0.5
  )
  np.testing.assert_allclose(
      loss_masked, 4 * math.log1p(math.exp(0.5)), rtol=1e-6
  )


def test_npo_token_level_matches_sequence_level():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
  ref = jnp.array([[-1.5, -1.0, -0.5], [-0.3, -0.2, -0.9]])
  w = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  loss, m = obj.npo(TLP(logp, w), ref, beta=0.3)
  want, _ = obj.npo_from_sequences(
      jnp.array([-3.0, -0.6]),
      jnp.array([-2.5, -1.4]),
      jnp.array([True, True]),
      0.3,
  )
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["forget_nll"], 3.6 / 5, rtol=1e-6)


def _forget_grad(cfg, logp, w, ref=None, retain=None):
  def f(lp):
    return obj.unlearning_loss(cfg, TLP(lp, w), retain, ref)[0]

  return jax.grad(f)(logp)


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo"])
def test_forget_gradient_pushes_likelihood_down(name):
  key = jax.random.PRNGKey(0)
  logp = -jax.random.uniform(key, (3, 5), minval=0.1, maxval=4.0)
  ref = logp + jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  w = jnp.ones((3, 5)).at[:, -1].set(0.0)
  retain = TLP(-jnp.ones((2, 4)), jnp.ones((2, 4)))
  g = _forget_grad(obj.ObjectiveConfig(name), logp, w, ref, retain)
  # Descent moves logp by -lr * g: strictly down on every weighted token,
  # untouched on padding.
  assert bool(jnp.all(g[:, :-1] > 0))
  np.testing.assert_array_equal(g[:, -1], 0.0)


def test_retain_gradient_pushes_retain_likelihood_up():
  forget = TLP(-jnp.ones((1, 3)), jnp.ones((1, 3)))
  w = jnp.array([[1.0, 2.0, 0.0]])
  cfg = obj.ObjectiveConfig("graddiff", retain_coeff=3.0)
  g = jax.grad(lambda lp: obj.unlearning_loss(cfg, forget, TLP(lp, w))[0])(
      -jnp.ones((1, 3))
  )
  np.testing.assert_allclose(g, [[-1.0, -2.0, 0.0]])  # -3 * w / sum(w)


def test_npo_gradient_is_ga_gradient_times_adaptive_weight():
  beta = 0.7
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3], [-3.0, -1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5], [-0.3, -0.2, -0.9], [-9.0, -1.0, -2.0]])
  w = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
  g = _forget_grad(obj.ObjectiveConfig("npo", npo_beta=beta), logp, w, ref)
  r = np.sum(w * (logp - ref), axis=1)
  # Sequence-level GA has gradient w_t / N; NPO scales it by 2 sigma(beta r).
  ga_seq_grad = np.asarray(w) / 3
  want = ga_seq_grad * (2 / (1 + np.exp(-beta * r)))[:, None]
  np.testing.assert_allclose(g, want, rtol=1e-5)
  # The weight is bounded by 2 (GA's is unbounded in effect: it never
  # decays) and decays towards 0 once a sequence is far below the reference.
  far_below = ref.at[:, 0].add(100.0)
  g_far = _forget_grad(
      obj.ObjectiveConfig("npo", npo_beta=beta), logp, w, far_below
  )
  assert float(jnp.max(g_far)) < 1e-12
  far_above = ref.at[:, 0].add(-100.0)
  g_above = _forget_grad(
      obj.ObjectiveConfig("npo", npo_beta=beta), logp, w, far_above
  )
  np.testing.assert_allclose(g_above, 2 * ga_seq_grad, rtol=1e-5)


def test_npo_equals_ga_at_reference_and_for_small_beta():
  logp = jnp.array([[-1.0, -2.0], [-0.5, -0.7]])
  w = jnp.ones((2, 2))
  ga_seq = np.asarray(w) / 2
  g0 = _forget_grad(obj.ObjectiveConfig("npo"), logp, w, logp)
  np.testing.assert_allclose(g0, ga_seq, rtol=1e-6)
  ref = logp - 2.0
  g_small = _forget_grad(
      obj.ObjectiveConfig("npo", npo_beta=1e-4), logp, w, ref
  )
  np.testing.assert_allclose(g_small, ga_seq, rtol=1e-3)


def test_npo_reference_gets_no_gradient():
  logp = jnp.array([[-1.0, -2.0]])
  w = jnp.ones((1, 2))
  g = jax.grad(
      lambda ref: obj.unlearning_loss(
          obj.ObjectiveConfig("npo"), TLP(logp, w), None, ref
      )[0]
  )(logp - 1.0)
  np.testing.assert_array_equal(g, 0.0)


def test_npo_with_retain_term():
  forget = TLP(jnp.array([[-1.0, -2.0]]), jnp.ones((1, 2)))
  retain = TLP(jnp.array([[-0.4, -0.6]]), jnp.ones((1, 2)))
  cfg = obj.ObjectiveConfig("npo", retain_coeff=2.0, npo_beta=0.1)
  loss, m = obj.unlearning_loss(cfg, forget, retain, forget.logp)
  # At pi = pi_ref the NPO term is (2 / beta) log 2.
  np.testing.assert_allclose(loss, 20 * math.log(2.0) + 2 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["retain_nll"], 0.5)


def test_config_and_input_validation():
  with pytest.raises(ValueError, match="'sgd'"):
    obj.ObjectiveConfig("sgd")
  with pytest.raises(ValueError, match="graddiff"):
    obj.ObjectiveConfig("ga", retain_coeff=1.0)
  with pytest.raises(ValueError, match="npo_beta=0"):
    obj.ObjectiveConfig("npo", npo_beta=0)
  with pytest.raises(ValueError, match="forget_coeff=-1"):
    obj.ObjectiveConfig(forget_coeff=-1)
  forget = TLP(-jnp.ones((1, 2)), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="retain batch"):
    obj.unlearning_loss(obj.ObjectiveConfig("graddiff"), forget)
  with pytest.raises(ValueError, match="ref_forget_logp"):
    obj.unlearning_loss(obj.ObjectiveConfig("npo"), forget)
  with pytest.raises(ValueError, match="Shapes must match"):
    obj.mean_nll(jnp.ones((2, 3)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    obj.sequence_log_likelihood(
        TLP(
            jnp.ones((1, 2, 3)),
            jnp.ones((1, 2, 3)),
            jnp.ones((1, 2, 3), jnp.int32),
        )
    )
