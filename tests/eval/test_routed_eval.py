"""Tier-1 inference routing in evaluation, on tiny random-init models.

The routing decisions do not depend on the model, and the mode identities
checked here (a one-partition ensemble is that partition) hold for any
parameters, so the models are untrained.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import tasks  # pylint: disable=unused-import
from tasks import vocab
from tiered_routing import sharding
from tiered_routing.data import corpora
from tiered_routing.data import eval_data
from tiered_routing.data import seqio_names
from tiered_routing.eval import routed_eval
from tiered_routing.eval import scoring
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import inference_routing as ir
from tiered_routing.tier1 import language_classifier
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

LENGTH = 128  # The quickstart's.
ROWS = 16
FAMILY4 = schemes.family(4)


def _scorer(num_partitions):
  config = decoder_config.DecoderConfig(
      vocab_size=4096,
      d_model=16,
      num_heads=2,
      head_dim=8,
      num_layers=1,
      num_experts=2,
      expert_d_ff=16,
      top_k=1,
      num_partitions=num_partitions,
      dispatch="einsum",
      group_size=LENGTH,
  )
  model = transformer.TieredDecoder(config)
  mesh = sharding.make_mesh(
      sharding.MeshConfig(data=1), devices=jax.devices()[:1]
  )
  tokens = np.zeros((num_partitions, 1, LENGTH), np.int32)
  with sharding.with_sharding_rules(mesh):
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  return mesh, scoring.PartitionScorer(model, nn.meta.unbox(params), mesh, ROWS)


@pytest.fixture(scope="module")
def data():
  """(validation batches, classifier) of the sample's family-4 mixtures."""
  names = seqio_names.partition_mixture_names("sample", FAMILY4)
  batches = list(eval_data.split_batches(names, LENGTH, ROWS))
  # The sample tasks' train documents (what `eval_data.train_texts` reads
  # through SeqIO in the binary) are the corpus's train paragraphs.
  texts = {c: corpora.UDHR16.split_lines(c, "train") for c in languages.CODES}
  return batches, language_classifier.LanguageClassifier().fit(texts)


def _routed(scorer, config, clf):
  scheme = schemes.family(scorer.num_partitions)
  return routed_eval.RoutedScorer(
      scorer, scheme, vocab.get_vocabulary("sample"), config, clf
  )


def test_classifier_routes_validation_text_to_its_family(data):
  # Routing does not depend on the model, so no model runs here. Measured:
  # every validation sequence (each chunk of <= 127 tokens of a held-out
  # paragraph, decoded) goes to its family's partition, in every language.
  hits, counts = np.zeros(16), np.zeros(16)
  for batch in data[0]:
    texts = scoring.row_texts(batch, vocab.get_vocabulary("sample"))
    post = data[1].partition_posterior(texts, FAMILY4)
    routed_B = ir.routed_partition("classifier", posterior=post)
    lang_B = batch["decoder_language_ids"][:, 0]
    oracle_B = FAMILY4.language_to_partition_table()[lang_B]
    np.add.at(hits, lang_B, np.asarray(routed_B) == oracle_B)
    np.add.at(counts, lang_B, 1)
  assert counts.min() >= 9  # every language, >= 1 sequence a paragraph
  np.testing.assert_array_equal(hits, counts)


@pytest.fixture(scope="module")
def family4_results(data):
  """Top-1 ensemble and classifier modes on the first two batches."""
  config = routed_eval.RoutingConfig(
      ["classifier", "ensemble"], weighting="posterior", top_k=1
  )
  mesh, scorer = _scorer(4)
  routed = _routed(scorer, config, data[1])
  with sharding.with_sharding_rules(mesh):
    return routed_eval.evaluate(routed, data[0][:2])


def test_top1_ensemble_is_the_classifier_partition(family4_results):
  ens = "routing/ensemble_posterior_top1"
  codes = [c for c in languages.CODES if f"{ens}/{c}/loss" in family4_results]
  assert len(codes) >= 2
  for code in (*codes, "all", "macro"):
    for metric in ("loss", "bits_per_byte", "num_tokens", "num_bytes"):
      key = f"{code}/{metric}"
      if metric.startswith("num_") and code == "macro":
        continue
      np.testing.assert_allclose(
          family4_results[f"{ens}/{key}"],
          family4_results[f"routing/classifier/{key}"],
          rtol=1e-6,
          err_msg=key,
      )
    # Routed to the oracle's partition: the same numbers, zero cost.
    assert family4_results[f"routing/classifier/{code}/loss_cost"] == 0.0
  assert family4_results[f"{ens}/all/routing_accuracy"] == 1.0
  # All the weight sits on the routed partition.
  assert family4_results[f"{ens}/all/oracle_weight"] == pytest.approx(1.0)


def test_costs_and_table_golden():
  results = {
      "routing/oracle/hi/loss": 2.0,
      "routing/oracle/hi/bits_per_byte": 1.0,
      "routing/classifier/hi/loss": 2.5,
      "routing/classifier/hi/bits_per_byte": 1.25,
      "routing/classifier/hi/routing_accuracy": 0.5,
  }
  out = routed_eval.with_costs(results, ("oracle", "classifier"))
  assert out["routing/classifier/hi/loss_cost"] == 0.5
  assert out["routing/classifier/hi/bits_per_byte_cost"] == 0.25
  assert out["routing/oracle/hi/loss_cost"] == 0.0
  table = routed_eval.format_table(out, ("classifier",)).splitlines()
  assert table[0] == "== classifier"
  assert table[1].split() == ["lang", *routed_eval.TABLE_METRICS]
  assert table[2].split() == [
      "hi",
      "2.5000",
      "1.2500",
      "0.5000",
      "0.5000",
      "0.2500",
  ]


def test_bad_routing_settings_name_the_value():
  with pytest.raises(ValueError, match=r"'clasifier'; allowed: \('oracle'"):
    routed_eval.RoutingConfig(["oracle", "clasifier"])
  with pytest.raises(ValueError, match="'bayes'; allowed"):
    routed_eval.RoutingConfig(weighting="bayes")
  with pytest.raises(ValueError, match="top_k=0"):
    routed_eval.RoutingConfig(top_k=0)
  assert routed_eval.RoutingConfig("classifier").modes == (
      "oracle",
      "classifier",
  )
  assert not routed_eval.RoutingConfig(
      "ensemble", weighting="prefix"
  ).needs_classifier


@pytest.mark.parametrize("weighting", ["posterior", "prefix"])
def test_opt_out_routes_around_a_switched_off_partition(data, weighting):
  batches = [data[0][0], data[0][-1]]  # Partitions' mixtures in order.
  present = sorted({
      int(b["decoder_language_ids"][r, 0]) for b in batches
      for r in range(len(b["decoder_loss_weights"]))
      if b["decoder_loss_weights"][r].sum()
  })
  off = FAMILY4.partition_of(languages.CODES[present[0]])
  on = [l for l in present if FAMILY4.partition_of(languages.CODES[l]) != off]
  assert on, "the batches should hold languages of two partitions"
  config = routed_eval.RoutingConfig(
      ["classifier", "ensemble"], weighting=weighting,
      disabled_partitions=[off],
  )
  mesh, scorer = _scorer(4)
  with sharding.with_sharding_rules(mesh):
    out = routed_eval.evaluate(_routed(scorer, config, data[1]), batches)
  ens = f"routing/{config.label('ensemble')}"
  for lang in present:
    code = languages.CODES[lang]
    if FAMILY4.partition_of(code) == off:
      # No route: scored as the uniform distribution, every row.
      assert out[f"routing/oracle/{code}/loss"] == pytest.approx(np.log(4096))
      assert out[f"routing/oracle/{code}/unroutable"] == 1.0
      assert out[f"{ens}/{code}/oracle_weight"] == pytest.approx(0.0, abs=1e-6)
    shares = [v for k, v in out.items()
              if k.startswith(f"routing/classifier/{code}/routed_to_p")]
    assert sum(shares) == pytest.approx(1.0)
  assert not [k for k in out if k.endswith(f"routed_to_p{off}")]


def test_opt_out_bad_partitions_are_named():
  with pytest.raises(ValueError, match="'x' is not a partition index"):
    routed_eval.RoutingConfig("oracle", disabled_partitions=["x"])
  mesh, scorer = _scorer(4)
  del mesh
  with pytest.raises(ValueError, match="allowed: ints in 0..3"):
    _routed(scorer, routed_eval.RoutingConfig(
        "oracle", disabled_partitions=[4]), None)
  with pytest.raises(ValueError, match="switches off all 4"):
    _routed(scorer, routed_eval.RoutingConfig(
        "oracle", disabled_partitions=[0, 1, 2, 3]), None)
