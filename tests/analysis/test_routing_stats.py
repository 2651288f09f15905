"""Routing statistics: golden values on hand-built and planted counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiered_routing.analysis import routing_stats as rs
from tiered_routing.eval import routing_counts as rc
from tiered_routing.model import routing
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import layout
from tiered_routing.tier1 import schemes

H_QUARTER = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.811278


def _planted(sizes=(1, 1, 1, 1), block=2):
  """Language i uses only experts [block*i, block*(i+1)), uniformly."""
  n = len(sizes)
  counts = np.zeros((n, n * block))
  for i, size in enumerate(sizes):
    counts[i, block * i : block * (i + 1)] = 10 * size
  return counts


def test_two_by_two_golden():
  counts = np.array([[3.0, 1.0], [1.0, 3.0]])
  np.testing.assert_allclose(
      rs.expert_distribution(counts), [[0.75, 0.25], [0.25, 0.75]]
  )
  np.testing.assert_allclose(rs.normalized_entropy(counts), [H_QUARTER] * 2)
  np.testing.assert_allclose(rs.top_m_coverage(counts, 1), [0.75, 0.75])
  # I = H(E) - H(E|L) = 1 - h(1/4); JS(P, Q) with M uniform is the same.
  assert rs.mutual_information(counts) == pytest.approx(1 - H_QUARTER)
  assert rs.normalized_mutual_information(counts) == pytest.approx(
      1 - H_QUARTER
  )
  js = rs.js_divergence_matrix(counts)
  np.testing.assert_allclose(
      js, [[0, 1 - H_QUARTER], [1 - H_QUARTER, 0]], atol=1e-12
  )


def test_planted_blocks_uniform_prior():
  counts = _planted(sizes=(1, 1, 2, 4))
  assert rs.mutual_information(counts, "uniform") == pytest.approx(2.0)
  assert rs.normalized_mutual_information(counts, "uniform") == (
      pytest.approx(1.0)
  )
  # Empirical prior: I = H(L) for the language sizes 1:1:2:4.
  h_l = -sum(p * math.log2(p) for p in (1 / 8, 1 / 8, 1 / 4, 1 / 2))
  assert rs.mutual_information(counts) == pytest.approx(h_l)
  np.testing.assert_allclose(rs.normalized_entropy(counts), 1 / 3)  # 1/log2 8
  np.testing.assert_allclose(rs.top_m_coverage(counts, 1), 0.5)
  np.testing.assert_allclose(rs.top_m_coverage(counts, 2), 1.0)
  np.testing.assert_allclose(
      rs.js_divergence_matrix(counts), 1 - np.eye(4), atol=1e-12
  )


def test_shared_experts_have_no_information():
  counts = np.tile([[5.0, 1.0, 2.0]], (3, 1)) * [[1], [2], [7]]
  assert rs.mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
  assert rs.normalized_mutual_information(np.ones((3, 1))) == 0.0
  np.testing.assert_allclose(rs.js_divergence_matrix(counts), 0, atol=1e-12)


def test_absent_languages_and_errors():
  counts = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
  assert np.isnan(rs.normalized_entropy(counts)[1])
  assert np.isnan(rs.js_divergence_matrix(counts)[1]).all()
  # Uniform prior over the two routed languages only.
  assert rs.mutual_information(counts, "uniform") == pytest.approx(1.0)
  with pytest.raises(ValueError, match="m=3"):
    rs.top_m_coverage(counts, 3)
  with pytest.raises(ValueError, match="Unknown language_prior 'flat'"):
    rs.mutual_information(counts, "flat")
  with pytest.raises(ValueError, match=r"\[languages, experts\]"):
    rs.mutual_information(np.ones(3))


def test_compartmentalization_golden():
  codes = ("a", "b", "c")
  counts = np.array(
      [[6.0, 2.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
  )
  c = rs.compartmentalization(counts, "a", m=1, codes=codes)
  assert c.top_experts == (0,)
  assert c.top_m_coverage == pytest.approx(0.75)
  assert c.normalized_entropy == pytest.approx(H_QUARTER / 2)  # log2(4) = 2
  # Uniform prior: p(e) = mean of the rows (3/4, 1/4, 0, 0), (0, 1/2, 1/2,
  # 0), (0, 0, 1/2, 1/2) = (1/4, 1/4, 1/3, 1/6).
  spec = 0.75 * math.log2(0.75 / 0.25) + 0.25 * math.log2(0.25 / 0.25)
  assert c.specificity_bits == pytest.approx(spec)
  assert c.exclusivity == pytest.approx(1.0)  # only "a" uses expert 0
  assert c.others_top_m_share == 0.0
  assert c.nearest_language == "b"
  js_ab = rs.js_divergence_matrix(counts)[0, 1]
  assert c.nearest_js_bits == pytest.approx(js_ab)
  # Specificities average (under the prior) to the mutual information.
  mean_spec = np.mean(
      [
          rs.compartmentalization(counts, x, 1, codes=codes).specificity_bits
          for x in codes
      ]
  )
  assert mean_spec == pytest.approx(rs.mutual_information(counts, "uniform"))
  c2 = rs.compartmentalization(counts, "b", m=2, codes=codes)
  assert set(c2.top_experts) == {1, 2} and c2.top_m_coverage == 1.0
  assert c2.others_top_m_share == pytest.approx((0.25 + 0.5) / 2)
  with pytest.raises(ValueError, match="Unknown language 'z'"):
    rs.compartmentalization(counts, "z", 1, codes=codes)


def test_accumulator_counts_by_hand():
  acc = rc.RoutingCounts(num_layers=2, num_experts=4, num_languages=3)
  expert_index = np.array([[[0, 1], [2, 3]], [[0, 3], [1, 1]]])  # [G, S, K]
  weights = np.array([[[0.7, 0.3], [1.0, 0.0]], [[0.5, 0.5], [0.6, 0.4]]])
  lang = np.array([[0, 2], [2, 7]])  # the padding token carries a bad id
  mask = np.array([[1, 1], [1, 0]])
  acc.add(1, expert_index, weights, lang, mask)
  expected = np.zeros((3, 4))
  expected[0, [0, 1]] = 1
  expected[2, [2, 0, 3]] = 1  # expert 3's zero-weight slot is not routed
  np.testing.assert_array_equal(acc.usage(1), expected)
  mass = np.zeros((3, 4))
  mass[0, :2] = [0.7, 0.3]
  mass[2, [2, 0, 3]] = [1.0, 0.5, 0.5]
  np.testing.assert_allclose(acc.usage(1, weighted=True), mass)
  np.testing.assert_array_equal(acc.tokens_NxM[:, 1], [1, 0, 2])
  assert not acc.usage(0).any()
  other = rc.RoutingCounts(2, 4, 3)
  other.add(0, [[1]], [[1.0]], [0])
  acc.merge(other)
  assert acc.usage(0)[0, 1] == 1
  summary = rs.summary(acc, m=1)
  assert summary["top_m_coverage_MxN"].shape == (2, 3)
  assert summary["mutual_information_bits_M"][1] == pytest.approx(
      rs.mutual_information(expected, "uniform")
  )
  with pytest.raises(ValueError, match="language id 7"):
    acc.add(0, expert_index, weights, lang)
  with pytest.raises(ValueError, match="expert index 4"):
    acc.add(0, [[4]], [[1.0]], [0])
  with pytest.raises(ValueError, match="layer=2"):
    acc.add(2, [[0]], [[1.0]], [0])


def test_save_load(tmp_path):
  acc = rc.RoutingCounts(1, 2, 2)
  acc.add(0, [[0], [1]], [[1.0], [0.5]], [0, 1])
  acc.save(tmp_path / "counts.npz")
  loaded = rc.RoutingCounts.load(tmp_path / "counts.npz")
  np.testing.assert_array_equal(loaded.mass_NxMxE, acc.mass_NxMxE)
  np.testing.assert_array_equal(loaded.tokens_NxM, acc.tokens_NxM)


def test_partition_masked_router_is_compartmentalized():
  """A real top-2 router under a tier-1 family mask: each language's routing
  stays inside its partition's experts, so languages of different families
  have JS divergence 1 bit."""
  num_experts, scheme = 8, schemes.family(4)
  num_tokens = 4 * languages.NUM_LANGUAGES
  lang_T = np.arange(num_tokens) % languages.NUM_LANGUAGES
  part_T = scheme.language_to_partition_table()[lang_T]
  per_part = num_experts // scheme.num_partitions
  mask_TxE = layout.partition_expert_mask(part_T, 4, per_part)
  router = routing.TokenTopKRouter(num_experts=num_experts, top_k=2)
  x_TxD = jax.random.normal(jax.random.PRNGKey(0), (num_tokens, 16))
  params = router.init(jax.random.PRNGKey(1), x_TxD)
  out = router.apply(params, x_TxD, expert_mask_TxE=jnp.asarray(mask_TxE))
  acc = rc.RoutingCounts(num_layers=1, num_experts=num_experts)
  acc.add(0, out.expert_index_TxK, out.combine_weights_TxK, lang_T)
  usage = acc.usage(0)
  allowed_NxE = (
      np.arange(num_experts)[None] // per_part
  ) == scheme.language_to_partition_table()[:, None]
  assert not usage[~allowed_NxE].any()
  assert usage.sum() == 2 * num_tokens
  np.testing.assert_allclose(
      acc.usage(0, weighted=True).sum(), num_tokens, rtol=1e-5
  )
  js = rs.js_divergence_matrix(usage)
  fam = scheme.language_to_partition_table()
  across = fam[:, None] != fam[None, :]
  np.testing.assert_allclose(js[across], 1.0)
  # Top-2 over 2 experts per family: the top-2 coverage is complete.
  np.testing.assert_allclose(rs.top_m_coverage(usage, 2), 1.0)


def test_entropy_is_normalized_over_the_reachable_experts():
  # ur (id 10) spreads evenly over experts 4..7 of 16 (partition 1 of 4);
  # en (id 13) uses expert 0 only.
  counts = rc.RoutingCounts(num_layers=1, num_experts=16)
  ur, en = languages.language_id("ur"), languages.language_id("en")
  counts.add(0, [[4], [5], [6], [7]], [[1.0]] * 4, [ur] * 4)
  counts.add(0, [[0]], [[1.0]], [en])
  columns = rs.compartmentalization_columns(counts, "ur", 2, range(4, 8))
  assert columns["comp_entropy"] == pytest.approx(1.0)
  assert columns["comp_top_m_mass"] == pytest.approx(0.5)
  whole = rs.compartmentalization_columns(counts, "ur", 2)
  assert whole["comp_entropy"] == pytest.approx(0.5)  # log 4 / log 16
