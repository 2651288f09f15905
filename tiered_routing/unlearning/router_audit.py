"""Utility and routing under the classifier router, after each method.

The sweep scores every language through its own partition (the oracle
route). At inference the language label may be missing and a classifier
picks the partition (`tier1.inference_routing`, c-BTM): then two things
matter that the oracle hides. Retained languages pay the classifier's
routing errors, and the forget language, once its partition is dropped
(opted out, `tier1.opt_out`), is routed to whichever partition it looks
like, where it may still be predicted well: a dropped Urdu partition does
not stop the Hindi one from scoring Urdu text it never saw.

`ClassifierRouting` fits the tf-idf classifier once on the training text,
routes each evaluation row (a few per language) by the restricted
posterior, and evaluates a model with the rows laid out by that routing
(`eval.language_eval.LanguageEvaluator`, every partition on its routed
rows). Columns (`router_classifier_*`): retained and forget loss, the
retained change against the original under the same router, routing
accuracy of the retained languages, the share of the forget language's
rows routed to its own partition, and the partition most of them go to.
"""

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from tiered_routing.data import eval_data
from tiered_routing.data import feature_rows
from tiered_routing.data import stream_cache
from tiered_routing.eval import language_eval
from tiered_routing.eval import scoring
from tiered_routing.tier1 import language_classifier
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import opt_out

PREFIX = "router_classifier"


@functools.lru_cache(maxsize=None)
def _classifier(task_names: tuple[str, ...], docs: int):
  """The tf-idf classifier fit on the tasks' training text (once)."""
  texts = eval_data.train_texts(list(task_names), docs)
  return language_classifier.LanguageClassifier().fit(texts)


class ClassifierRouting:
  """Classifier-routed evaluation of one trained configuration.

  Args:
    c: the trained configuration.
    rows_per_language: evaluation rows per language (spread over the
      evaluation split).
    docs: training documents per language the classifier is fit on.
    temperature: the posterior's softmax temperature.
  """

  def __init__(self, c, rows_per_language: int = 8, docs: int = 1000,
               temperature: float = 0.1):
    self.c = c
    tasks = {x: c.data.task_name(x) for x in languages.CODES}
    held = c.cache.validation_rows(tasks, split=c.config.eval_split)
    self.rows = {
        x: {k: v[stream_cache.spread(len(v), rows_per_language)]
            for k, v in r.items()}
        for x, r in held.items()
    }
    vocabulary = eval_data.vocabulary_of(tasks[languages.CODES[0]])
    self._vocabulary = vocabulary
    classifier = _classifier(tuple(tasks.values()), docs)
    self.posterior = {
        x: classifier.partition_posterior(
            scoring.row_texts(r, vocabulary), c.scheme, temperature)
        for x, r in self.rows.items()
    }
    self._evaluators = {}

  def routes(self, disabled: Sequence[int]) -> dict[str, np.ndarray]:
    """Each language's rows' partitions with `disabled` switched off."""
    enabled = opt_out.enabled_mask(self.c.scheme.num_partitions, disabled)
    return {
        x: np.argmax(opt_out.restrict_posterior(p, enabled), axis=-1)
        for x, p in self.posterior.items()
    }

  def _evaluator(self, disabled: tuple[int, ...], config):
    key = (disabled, config)
    if key not in self._evaluators:
      routes = self.routes(disabled)
      blocks = []
      for q in range(self.c.scheme.num_partitions):
        parts = [{k: v[routes[x] == q] for k, v in r.items()}
                 for x, r in self.rows.items()]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        blocks.append(feature_rows.chunk_rows(
            joined, self.c.config.eval_rows) if len(
                joined["decoder_target_tokens"]) else [])
      self._evaluators[key] = language_eval.LanguageEvaluator(
          config, blocks, self._vocabulary, to_device=self.c.to_device)
    return self._evaluators[key]

  def results(self, params, disabled=(), expert_mask_MxPxE=None,
              config=None) -> dict[str, Any]:
    """Per-language results of a model under the classifier router."""
    config = config or self.c.spec.model_config
    evaluator = self._evaluator(tuple(disabled), config)
    # Routing is captured (and ignored) so that the program is the one the
    # sweep's own scoring compiled (`configuration._evaluate`).
    return evaluator.evaluate(
        params, expert_mask_MxPxE=expert_mask_MxPxE, config=config,
        capture_routing=True,
    ).language_results()


def columns(
    routing: ClassifierRouting,
    results: dict[str, Any],
    original: dict[str, Any],
    disabled: Sequence[int],
) -> dict[str, Any]:
  """The `router_classifier_*` columns of one method's model."""
  c = routing.c
  code = c.config.forget_language
  retained = [x for x in languages.CODES if x != code]
  mean = lambda res: float(np.mean([res[x]["loss"] for x in retained]))
  routes = routing.routes(disabled)
  oracle = c.scheme.language_to_partition_table()
  hits = sum(int(np.sum(routes[x] == oracle[languages.language_id(x)]))
             for x in retained)
  total = sum(len(routes[x]) for x in retained)
  forget_routes = routes[code]
  own = c.scheme.partition_of(code)
  return {
      f"{PREFIX}_retain_loss": mean(results),
      f"{PREFIX}_retain_loss_delta": mean(results) - mean(original),
      f"{PREFIX}_forget_loss": float(results[code]["loss"]),
      f"{PREFIX}_accuracy": hits / total,
      f"{PREFIX}_forget_own_share": float(np.mean(forget_routes == own)),
      f"{PREFIX}_forget_routed_to": int(np.bincount(forget_routes).argmax()),
  }


def disabled_of(c, model) -> tuple[int, ...]:
  """The partitions a method's model leaves switched off: the forget
  partition when it was dropped (`model` None), else none."""
  return (c.forget_partition,) if model is None else ()
