"""A tf-idf nearest-centroid language router for tier-1 inference routing.

At training time tier 1 routes by the language label. At inference time the
label may be unknown, so a sample is routed the way c-BTM routes to its
clusters (Gururangan et al. 2023, "Scaling Expert Language Models with
Unsupervised Domain Discovery", Sec. 2.3): embed the text as a tf-idf vector
and score each centre c by exp(-||x - c||^2 / T). c-BTM finds its centres by
balanced k-means; here the "clusters" are the known languages, so each centre
is the mean tf-idf vector of one language's training text (a nearest-centroid,
or Rocchio, classifier). A partition's probability is the total probability of
its languages.

Features are character 1-3-grams with sublinear term frequency and smoothed
idf: character n-grams identify scripts and languages from a few dozen
characters (Cavnar & Trenkle 1994) and need no tokenizer, so the router does
not depend on the LM's vocabulary. Only numpy and scipy are used.
"""

from collections.abc import Mapping, Sequence
import collections
import dataclasses
import json

from etils import epath
import numpy as np
import scipy.sparse

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Feature extraction settings.

  Attributes:
    min_n: shortest character n-gram.
    max_n: longest character n-gram.
    max_features: keep the n-grams with the highest document frequency.
    lowercase: lowercase before extracting n-grams.
  """

  min_n: int = 1
  max_n: int = 3
  max_features: int = 50_000
  lowercase: bool = True

  def __post_init__(self):
    if not 1 <= self.min_n <= self.max_n:
      raise ValueError(
          f"n-gram range ({self.min_n}, {self.max_n}) is invalid; need "
          "1 <= min_n <= max_n"
      )
    if self.max_features < 1:
      raise ValueError(f"max_features must be >= 1, got {self.max_features}")


def _ngram_counts(text: str, config: ClassifierConfig) -> collections.Counter:
  """Character n-gram counts of one text, whitespace runs collapsed."""
  if not isinstance(text, str):
    raise ValueError(f"texts must be str, got {type(text).__name__}")
  text = " ".join(text.split())
  if config.lowercase:
    text = text.lower()
  # Spaces at both ends mark word boundaries of the first and last word.
  text = f" {text} "
  counts = collections.Counter()
  for n in range(config.min_n, config.max_n + 1):
    counts.update(text[i : i + n] for i in range(len(text) - n + 1))
  return counts


def _l2_normalize_rows(x):
  """Rows scaled to unit L2 norm (zero rows stay zero); sparse or dense."""
  if scipy.sparse.issparse(x):
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return scipy.sparse.diags(inv) @ x
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _softmax(logits_BxN: np.ndarray) -> np.ndarray:
  z = logits_BxN - logits_BxN.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


class LanguageClassifier:
  """tf-idf character n-gram nearest-centroid classifier over languages.

  Usage:
    clf = LanguageClassifier().fit({"hi": [...], "en": [...], ...})
    clf.predict_language(texts)                  # ["hi", ...]
    clf.partition_posterior(texts, scheme)       # float64[B, P]
  """

  def __init__(self, config: ClassifierConfig = ClassifierConfig()):
    self.config = config
    self.codes: tuple[str, ...] = ()
    self.ngrams: tuple[str, ...] = ()
    self._index: dict[str, int] = {}
    self.idf_X = np.zeros((0,), np.float64)
    self.centroids_NxX = np.zeros((0, 0), np.float64)

  @property
  def is_fitted(self) -> bool:
    return bool(self.codes)

  def fit(
      self, texts_by_language: Mapping[str, Sequence[str]]
  ) -> "LanguageClassifier":
    """Learns the n-gram vocabulary, idf and one centroid per language."""
    if not texts_by_language:
      raise ValueError("fit needs texts of at least one language")
    for code, texts in texts_by_language.items():
      languages.get(code)
      if isinstance(texts, str) or not texts:
        raise ValueError(
            f"language {code!r} needs a non-empty sequence of texts, got "
            f"{type(texts).__name__} of length {len(texts)}"
        )
    codes = tuple(c for c in languages.CODES if c in texts_by_language)
    counts = [
        [_ngram_counts(t, self.config) for t in texts_by_language[c]]
        for c in codes
    ]
    doc_freq = collections.Counter()
    for per_lang in counts:
      for doc in per_lang:
        doc_freq.update(doc.keys())
    # Highest document frequency first; ties by n-gram for determinism.
    ranked = sorted(doc_freq.items(), key=lambda kv: (-kv[1], kv[0]))
    ranked = ranked[: self.config.max_features]
    self.codes = codes
    self.ngrams = tuple(g for g, _ in ranked)
    self._index = {g: i for i, g in enumerate(self.ngrams)}
    num_docs = sum(len(per_lang) for per_lang in counts)
    df_X = np.array([df for _, df in ranked], np.float64)
    # Smoothed idf: as if one extra document contained every n-gram.
    self.idf_X = np.log((1.0 + num_docs) / (1.0 + df_X)) + 1.0
    centroids = [
        np.asarray(self._tfidf(per_lang).mean(axis=0)).ravel()
        for per_lang in counts
    ]
    self.centroids_NxX = _l2_normalize_rows(np.stack(centroids))
    return self

  def _tfidf(self, doc_counts: Sequence[collections.Counter]):
    """Unit-norm sublinear tf-idf rows, csr float64[B, X]."""
    indptr, indices, values = [0], [], []
    for doc in doc_counts:
      for gram, count in doc.items():
        j = self._index.get(gram)
        if j is not None:
          indices.append(j)
          values.append(1.0 + np.log(count))
      indptr.append(len(indices))
    x = scipy.sparse.csr_matrix(
        (
            np.array(values, np.float64),
            np.array(indices, np.int64),
            np.array(indptr, np.int64),
        ),
        shape=(len(doc_counts), len(self.ngrams)),
    )
    return _l2_normalize_rows(x @ scipy.sparse.diags(self.idf_X))

  def _check_fitted(self) -> None:
    if not self.is_fitted:
      raise ValueError("LanguageClassifier is not fitted; call fit or load")

  def transform(self, texts: Sequence[str]):
    """Unit-norm tf-idf vectors of `texts`, csr float64[B, X]."""
    self._check_fitted()
    if isinstance(texts, str):
      raise ValueError("texts must be a sequence of str, got one str")
    return self._tfidf([_ngram_counts(t, self.config) for t in texts])

  def similarities(self, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of every text to every centroid, float64[B, N]."""
    return np.asarray(self.transform(texts) @ self.centroids_NxX.T)

  def predict_language(self, texts: Sequence[str]) -> list[str]:
    """The language of the nearest centroid for every text."""
    best_B = self.similarities(texts).argmax(axis=1)
    return [self.codes[i] for i in best_B]

  def language_posterior(
      self, texts: Sequence[str], temperature: float = 0.1
  ) -> np.ndarray:
    """c-BTM weights softmax(-||x - c||^2 / T) over languages, float64[B, N].

    x and c have unit norm, so ||x - c||^2 = 2 - 2 cos(x, c).
    """
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature!r}")
    sq_dist_BxN = 2.0 - 2.0 * self.similarities(texts)
    return _softmax(-sq_dist_BxN / temperature)

  def partition_posterior(
      self,
      texts: Sequence[str],
      scheme: schemes.PartitionScheme,
      temperature: float = 0.1,
  ) -> np.ndarray:
    """P(partition | text) = sum of its languages' posteriors, float64[B, P].

    Partitions none of whose languages were fitted get probability 0.
    """
    member_NxP = np.zeros((len(self.codes), scheme.num_partitions))
    for c, code in enumerate(self.codes):
      member_NxP[c, scheme.partition_of(code)] = 1.0
    return self.language_posterior(texts, temperature) @ member_NxP

  def predict_partition(
      self, texts: Sequence[str], scheme: schemes.PartitionScheme
  ) -> np.ndarray:
    """Partition of the predicted language, int32[B]."""
    return np.array(
        [scheme.partition_of(c) for c in self.predict_language(texts)], np.int32
    )

  def save(self, path) -> None:
    """Writes the fitted classifier to one .npz file (no pickles)."""
    self._check_fitted()
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": dataclasses.asdict(self.config),
    }
    with epath.Path(path).open("wb") as f:
      np.savez(
          f,
          meta=np.array(json.dumps(meta)),
          codes=np.array(self.codes),
          ngrams=np.array(self.ngrams),
          # File keys kept from format version 1 (before the package's
          # shape letters were unified): idf_F = idf_X, centroids_CxF =
          # centroids_NxX.
          idf_F=self.idf_X.astype(np.float32),
          centroids_CxF=self.centroids_NxX.astype(np.float32),
      )

  @classmethod
  def load(cls, path) -> "LanguageClassifier":
    """Reads a classifier written by `save`."""
    with epath.Path(path).open("rb") as f:
      arrays = dict(np.load(f, allow_pickle=False))
    meta = json.loads(str(arrays["meta"]))
    if meta.get("format_version") != _FORMAT_VERSION:
      raise ValueError(
          f"{path}: classifier format {meta.get('format_version')!r} is not "
          f"supported; allowed: {_FORMAT_VERSION}"
      )
    clf = cls(ClassifierConfig(**meta["config"]))
    clf.codes = tuple(str(c) for c in arrays["codes"])
    clf.ngrams = tuple(str(g) for g in arrays["ngrams"])
    clf._index = {g: i for i, g in enumerate(clf.ngrams)}
    clf.idf_X = arrays["idf_F"].astype(np.float64)
    clf.centroids_NxX = arrays["centroids_CxF"].astype(np.float64)
    return clf
