"""The tf-idf nearest-centroid tier-1 router on the embedded UDHR-16 corpus."""

import math

import numpy as np
import pytest

from tiered_routing.data import corpora
from tiered_routing.tier1 import language_classifier
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes


@pytest.fixture(scope="module")
def fitted():
  return language_classifier.LanguageClassifier().fit(
      {c: corpora.UDHR16.split_lines(c, "train") for c in languages.CODES}
  )


def _validation_accuracy(clf, truncate=None):
  """Per-language accuracy and per-family-partition accuracy."""
  scheme = schemes.family(4)
  lang_acc, hits, counts = {}, np.zeros(4), np.zeros(4)
  for code in languages.CODES:
    texts = [t[:truncate] for t in corpora.UDHR16.split_lines(code, "validation")]
    pred = clf.predict_language(texts)
    lang_acc[code] = np.mean([p == code for p in pred])
    post = clf.partition_posterior(texts, scheme)
    p = scheme.partition_of(code)
    hits[p] += np.sum(post.argmax(axis=1) == p)
    counts[p] += len(texts)
  return lang_acc, hits / counts


def test_tfidf_golden_on_tiny_corpus():
  clf = language_classifier.LanguageClassifier(
      language_classifier.ClassifierConfig(1, 1)
  )
  clf.fit({"de": ["B"], "en": ["a"]})  # lowercased: " b " and " a "
  assert clf.codes == ("en", "de")  # canonical language order
  assert clf.ngrams == (" ", "a", "b")  # df 2, 1, 1; ties by n-gram
  # Smoothed idf ln((1 + N) / (1 + df)) + 1 with N = 2 documents.
  idf_rare = math.log(1.5) + 1
  np.testing.assert_allclose(clf.idf_X, [1.0, idf_rare, idf_rare])
  # "a   a" becomes " a a ": tf(" ") = 3, tf(a) = 2; sublinear tf 1 + ln tf.
  x = clf.transform(["a   a"]).toarray()[0]
  expected = np.array([1 + math.log(3), (1 + math.log(2)) * idf_rare, 0.0])
  np.testing.assert_allclose(x, expected / np.linalg.norm(expected))
  # Each centroid is its one document's unit vector: " a " has tf(" ") = 2.
  np.testing.assert_allclose(
      clf.centroids_NxX[0],
      np.array([1 + math.log(2), idf_rare, 0.0])
      / math.hypot(1 + math.log(2), idf_rare),
  )
  assert clf.predict_language(["aa", "bbb"]) == ["en", "de"]


def test_routes_validation_paragraphs(fitted):
  lang_acc, family_acc = _validation_accuracy(fitted)
  print("language accuracy", lang_acc, "family accuracy", family_acc)
  assert (family_acc >= 0.95).all(), family_acc
  assert sum(a >= 0.9 for a in lang_acc.values()) >= 14, lang_acc
  assert np.mean(list(lang_acc.values())) >= 0.95


def test_routes_short_prefixes(fitted):
  # 50 characters (a sentence fragment) still identify the family.
  _, family_acc = _validation_accuracy(fitted, truncate=50)
  assert (family_acc >= 0.95).all(), family_acc


def test_posteriors_are_distributions(fitted):
  texts = [corpora.UDHR16.split_lines(c, "validation")[0] for c in ("ur", "de")]
  lang_post = fitted.language_posterior(texts)
  assert lang_post.shape == (2, 16)
  np.testing.assert_allclose(lang_post.sum(axis=1), 1.0)
  # per_language partitions are the languages themselves.
  np.testing.assert_allclose(
      fitted.partition_posterior(texts, schemes.per_language()), lang_post
  )
  fam = fitted.partition_posterior(texts, schemes.family(4))
  assert fam.shape == (2, 4)
  np.testing.assert_allclose(fam.sum(axis=1), 1.0)
  assert fam[0].argmax() == 2 and fam[1].argmax() == 3
  np.testing.assert_array_equal(
      fitted.predict_partition(texts, schemes.family(2)), [1, 1]
  )
  # A lower temperature sharpens the posterior towards the nearest centroid.
  sharp = fitted.language_posterior(texts, temperature=0.01)
  assert (sharp.max(axis=1) > lang_post.max(axis=1)).all()
  with pytest.raises(ValueError, match="temperature must be > 0"):
    fitted.language_posterior(texts, temperature=0.0)


def test_partitions_without_fitted_languages_get_zero():
  clf = language_classifier.LanguageClassifier().fit(
      {c: corpora.UDHR16.split_lines(c, "train")[:5] for c in ("hi", "en")}
  )
  post = clf.partition_posterior(
      ["Everyone has the right"], schemes.family(4)
  )
  np.testing.assert_array_equal(post[0, 1:3], 0.0)
  assert post[0, 3] > 0.99


def test_save_load_roundtrip(fitted, tmp_path):
  path = tmp_path / "router.npz"
  fitted.save(path)
  loaded = language_classifier.LanguageClassifier.load(path)
  assert loaded.codes == fitted.codes and loaded.ngrams == fitted.ngrams
  assert loaded.config == fitted.config
  texts = [
      t
      for c in languages.CODES
      for t in corpora.UDHR16.split_lines(c, "validation")[:2]
  ]
  assert loaded.predict_language(texts) == fitted.predict_language(texts)
  np.testing.assert_allclose(
      loaded.language_posterior(texts),
      fitted.language_posterior(texts),
      atol=1e-5,
  )


def test_bad_inputs():
  clf = language_classifier.LanguageClassifier()
  with pytest.raises(ValueError, match="not fitted"):
    clf.predict_language(["x"])
  with pytest.raises(ValueError, match="Unknown language 'xx'"):
    clf.fit({"xx": ["text"]})
  with pytest.raises(ValueError, match="'en' needs a non-empty sequence"):
    clf.fit({"en": "a single string"})
  with pytest.raises(ValueError, match="n-gram range"):
    language_classifier.ClassifierConfig(min_n=3, max_n=1)
  clf.fit({"en": ["text"]})
  with pytest.raises(ValueError, match="one str"):
    clf.predict_language("text")
