"""Forgetting one language from a trained configuration with every method.

`run_configuration` takes one configuration (n partitions x scheme x sharing
level): it trains the model (or resumes it), scores every language, trains
the reference model that never saw the forget language, then applies each
method and returns one `metrics.UnlearningResult` per method:

  exact_retrain  sharing 'none': partition p, the forget language's, is
                 retrained from the same initialisation on its stream without
                 the language (SISA). The trainer optimizes partitions
                 independently, so retraining the whole vmapped model with
                 only p's data stream changed leaves every other partition
                 bitwise identical (checked: column
                 `other_partitions_identical`); the cost counts p's steps and
                 tokens only. Sharing 'attention' / 'all': a full retrain
                 without the language. Either way the retrained model is also
                 the reference "never saw it" model.
  exact_drop     sharing 'none' when the language was its partition's only
                 one: the partition is dropped and the language becomes
                 unroutable. It then has no model at all; we score it as a
                 uniform distribution over the vocabulary (log V nats per
                 token: a system that must still answer falls back to knowing
                 nothing). The reference is the partition at its
                 initialisation, which is what retraining it on no data gives.
  mask           experts the forget language depends on (attribution from
                 forget vs retain routing on training data,
                 `expert_attribution`) are masked out of its partition's
                 router, layer by layer; no training.
  ga, graddiff, npo, trace
                 `finetune_loop` steps on forget batches (the language's own
                 task) and retain batches (the reference model's training
                 streams: the other languages of the forget partition under
                 sharing 'none', all other languages otherwise).

Results are scored per language on the validation split
(`language_eval`); the forget language's compartmentalization (top-m routing
mass, normalized entropy, language-expert mutual information) comes from the
trained model's validation routing and is added to every row.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import seqio

from tiered_routing import languages
from tiered_routing import optimizers
from tiered_routing import params as params_lib
from tiered_routing import partitioning
from tiered_routing import partitions
from tiered_routing import train_state
from tiered_routing import trainer
from tiered_routing.analysis import routing_stats
from tiered_routing.model import transformer
from tiered_routing.unlearning import exact
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import finetune_loop
from tiered_routing.unlearning import language_eval
from tiered_routing.unlearning import metrics
from tiered_routing.unlearning import streams

METHODS = ("exact", "mask") + finetune_loop.METHODS


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How a configuration's models are trained (original and reference)."""

  model_config: transformer.DecoderConfig
  optimizer_config: optimizers.OptimizerConfig
  train_config: trainer.TrainConfig
  batch_size: int
  sequence_length: int

  def __post_init__(self):
    p = self.model_config.num_partitions
    if self.batch_size < p or self.batch_size % p:
      raise ValueError(f"batch_size={self.batch_size} must be a positive "
                       f"multiple of num_partitions={p}.")

  @property
  def batch_shape(self) -> tuple[int, int, int]:
    p = self.model_config.num_partitions
    return (p, self.batch_size // p, self.sequence_length)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Registered SeqIO names (the library never imports the `tasks` package).

  Attributes:
    partition_names: the trained model's mixture per partition.
    task_name: language code -> its task, e.g. 'ur' -> 'tr.sample.ur_v1'.
    mixture_name: (routing table name, partition, codes) -> a registered
      mixture of those languages' tasks (the retrain data of a partition
      after forgetting, e.g. 'tr.sample.family4-ur.p2_v1').
  """

  partition_names: tuple[str, ...]
  task_name: Callable[[str], str]
  mixture_name: Callable[[str, int, tuple[str, ...]], str]


@dataclasses.dataclass(frozen=True)
class UnlearningConfig:
  """What to forget, with which methods and settings.

  Attributes:
    forget_language: code of the language to forget.
    methods: subset of METHODS ('exact' becomes exact_retrain or
      exact_drop).
    finetune: settings of the gradient methods.
    attribution: how `mask` and `trace` pick forget-critical experts.
    attribution_batches: forget and retain batches the attribution counts.
    top_m: m of the top-m routing mass (compartmentalization).
    seed: seed of the forget-language stream.
  """

  forget_language: str = "ur"
  methods: tuple[str, ...] = METHODS
  finetune: finetune_loop.FinetuneConfig = finetune_loop.FinetuneConfig()
  attribution: expert_attribution.AttributionConfig = (
      expert_attribution.AttributionConfig(selection="coverage",
                                           coverage=0.5))
  attribution_batches: int = 4
  top_m: int = 2
  seed: int = 0

  def __post_init__(self):
    languages.get(self.forget_language)
    bad = [m for m in self.methods if m not in METHODS]
    if bad or not self.methods:
      raise ValueError(f"UnlearningConfig.methods={self.methods!r}: unknown "
                       f"{bad}; allowed a non-empty subset of {METHODS}.")
    if not 1 <= self.attribution_batches <= self.finetune.steps:
      raise ValueError(
          f"attribution_batches={self.attribution_batches!r} must be in "
          f"[1, finetune.steps={self.finetune.steps}].")


@dataclasses.dataclass
class _Config:
  """One configuration being unlearned (internal state of the runner)."""

  run: str
  scheme: partitions.PartitionScheme
  spec: TrainSpec
  data: DataSpec
  config: UnlearningConfig
  cache: streams.DataCache
  mesh: Any
  plan: exact.ExactPlan = None
  original: Any = None
  base: language_eval.EvalResult = None
  evaluator: language_eval.LanguageEvaluator = None

  @property
  def strict(self) -> bool:
    return self.spec.model_config.sharing == "none"

  @property
  def p(self) -> int:
    return self.plan.partition

  def to_device(self, batch):
    return trainer.to_global_batch(batch, self.mesh)

  def score(self, params, mask=None) -> metrics.LanguageResults:
    """Every language's results; strict partitions rescore p's only."""
    if not self.strict:
      return self.evaluator.evaluate(params, mask).languages
    part = self.evaluator.evaluate(params, mask, [self.p]).languages
    return {**self.base.languages, **part}


def train_model(model_dir: str, spec: TrainSpec,
                names: Sequence[Optional[str]], cache: streams.DataCache,
                mesh) -> tuple[Any, np.ndarray]:
  """Trains (or resumes) a model on one stream per partition (None = none).

  Returns:
    (params, scored training tokens per partition, int64 [P]).
  """
  p, rows, _ = spec.batch_shape
  steps = spec.train_config.train_steps
  batches = cache.partitioned(names, rows, steps)
  state = trainer.train(
      model_dir=model_dir, model_config=spec.model_config,
      optimizer_config=spec.optimizer_config, config=spec.train_config,
      batches=streams.batches_fn(batches), batch_shape=spec.batch_shape,
      mesh=mesh)
  tokens = np.sum(batches["decoder_loss_weights"] > 0, axis=(0, 2, 3))
  assert tokens.shape == (p,)
  return state.params, tokens


def init_params(spec: TrainSpec, mesh) -> Any:
  """The parameters `trainer.train` starts from (same seed, same split)."""
  s = train_state.setup(spec.model_config, spec.optimizer_config,
                        spec.train_config.train_steps, mesh, spec.batch_shape)
  init_rng, _ = jax.random.split(jax.random.key(spec.train_config.seed))
  with partitioning.with_sharding_rules(mesh):
    return train_state.init_state(s, init_rng, spec.batch_shape).params


def compartmentalization(counts: routing_stats.RoutingCounts, code: str,
                         m: int) -> dict[str, float]:
  """The forget language's concentration in experts, averaged over layers.

  Returns:
    comp_top_m_mass (share of its routing in its m most used experts),
    comp_entropy (normalized entropy over all the model's experts),
    comp_specificity_bits (its KL term of I(L; E)) and comp_mi_bits (I(L; E)
    over all languages, uniform language prior).
  """
  rows = [routing_stats.compartmentalization(counts.usage(l), code, m)
          for l in range(counts.shape[1])]
  mi = [routing_stats.mutual_information(counts.usage(l), "uniform")
        for l in range(counts.shape[1])]
  return {"comp_top_m": m,
          "comp_top_m_mass": float(np.mean([r.top_m_coverage for r in rows])),
          "comp_entropy": float(np.mean([r.normalized_entropy
                                         for r in rows])),
          "comp_specificity_bits": float(np.mean([r.specificity_bits
                                                  for r in rows])),
          "comp_mi_bits": float(np.mean(mi))}


def _uniform_forget(results: metrics.LanguageResults, code: str,
                    vocab_size: int) -> metrics.LanguageResults:
  """`results` with `code` scored as a uniform distribution (unroutable)."""
  r = dict(results[code])
  r["loss"] = math.log(vocab_size)
  r["bpb"] = r["loss"] * r["tokens"] / math.log(2) / r["bytes"]
  return {**results, code: r}


def _identical_except(a: Any, b: Any, partition: int) -> bool:
  """Whether two strict-partition param trees agree bitwise off `partition`."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    keep = np.arange(x.shape[0]) != partition
    if not np.array_equal(x[keep], y[keep]):
      return False
  return True


def _reference_names(c: _Config) -> list[Optional[str]]:
  names: list[Optional[str]] = list(c.data.partition_names)
  retained = c.plan.retain_languages
  names[c.p] = (c.data.mixture_name(c.plan.routing.name, c.p, retained)
                if retained else None)
  return names


def _reference(c: _Config, work_dir: str, active: int):
  """(reference results, exact method row parts)."""
  code, cfg = c.config.forget_language, c.spec.model_config
  if c.strict and c.plan.action == "drop":
    ref = c.score(init_params(c.spec, c.mesh))
    langs = _uniform_forget(c.base.languages, code, cfg.vocab_size)
    return ref, ("exact_drop", langs, metrics.UnlearningCost(
        active_params=active), {})
  params, tokens = train_model(os.path.join(work_dir, "reference"), c.spec,
                               _reference_names(c), c.cache, c.mesh)
  ref = c.score(params)
  extra = {}
  if c.strict:
    extra["other_partitions_identical"] = _identical_except(
        c.original, params, c.p)
    if not extra["other_partitions_identical"]:
      logging.warning("%s: retraining partition %d changed other "
                      "partitions' parameters.", c.run, c.p)
    tokens = tokens[c.p:c.p + 1]
  cost = metrics.UnlearningCost(
      steps=c.spec.train_config.train_steps, train_tokens=int(tokens.sum()),
      active_params=active)
  return ref, ("exact_retrain", ref, cost, extra)


def _unlearning_batches(c: _Config) -> tuple[streams.Rows, streams.Rows]:
  """Forget and retain batches {feature: [N, P', R, L]} (P' = 1 strict)."""
  ft = c.config.finetune
  n, r = ft.steps, ft.rows_per_batch
  forget = c.cache.stream(c.data.task_name(c.config.forget_language),
                          c.config.seed, r, n)
  names = _reference_names(c)
  p_all, rows, _ = c.spec.batch_shape
  ref = c.cache.partitioned(names, rows, c.spec.train_config.train_steps)
  touched = [c.p] if c.strict else list(range(p_all))
  retain = [streams.rechunk({k: v[:, q] for k, v in ref.items()}, r, n)
            for q in touched]
  forgets = [forget if q == c.p else streams.zeros_like(forget)
             for q in touched]
  return streams.stack(forgets, axis=1), streams.stack(retain, axis=1)


def _attribution(c: _Config, forget, retain):
  """(critical experts bool [M, P, E], forward tokens, extra columns)."""
  a = c.config.attribution_batches
  e = c.spec.model_config.num_experts
  part = c.p if c.strict else None
  counts = c.evaluator.new_counts()
  for batches in (forget, retain):
    c.evaluator.run(c.original, ({k: v[i] for k, v in batches.items()}
                                 for i in range(a)), partition=part,
                    counts=counts)
  code = c.config.forget_language
  shared = c.spec.model_config.sharing == "all"
  if shared:
    cols = slice(None)
    retained = [x for x in languages.CODES if x != code]
  else:
    cols = slice(c.p * e, (c.p + 1) * e)
    retained = [x for x in c.scheme.partitions[c.p] if x != code]
  ids = [languages.language_id(x) for x in retained]
  fid = languages.language_id(code)
  f_forget = counts.assignments_NxLxE[fid][:, cols] / np.maximum(
      counts.tokens_NxL[fid][:, None], 1)
  f_retain = counts.assignments_NxLxE[ids][:, :, cols].sum(0) / np.maximum(
      counts.tokens_NxL[ids].sum(0)[:, None], 1)
  critical, _ = expert_attribution.critical_experts(f_forget, f_retain,
                                                    c.config.attribution)
  allowed = expert_attribution.router_mask(
      critical, c.spec.model_config.num_partitions,
      partitions=None if shared else [c.p])
  tokens = sum(streams.scored_tokens({k: v[:a] for k, v in b.items()})
               for b in (forget, retain))
  extra = {"masked_experts": int(critical.sum()),
           "critical_experts": " ".join(
               f"L{l}:" + ",".join(map(str, np.flatnonzero(row)))
               for l, row in enumerate(critical))}
  return ~allowed, tokens, extra


def _gradient_method(c: _Config, method: str, forget, retain, critical,
                     active: int, attribution_tokens: int):
  """Runs one gradient method; returns its row parts."""
  ft_config = c.config.finetune
  cfg = c.spec.model_config
  strict = c.strict
  model_cfg = language_eval.one_partition_config(cfg) if strict else cfg
  ft = finetune_loop.make_finetuner(model_cfg, c.spec.optimizer_config,
                                    ft_config)
  start = (language_eval.partition_params(c.original, c.p) if strict
           else c.original)
  if cfg.sharing == "attention":
    mask = finetune_loop.update_mask(ft.model, start, c.p)
  else:
    mask = jax.tree.map(lambda _: np.ones((), np.float32), start)
  crit = critical[:, c.p:c.p + 1] if strict else critical
  coeffs = ft_config.coefficients(method)
  new, history = finetune_loop.finetune(ft, start, forget, retain, coeffs,
                                        crit, mask, c.to_device)
  params = (language_eval.with_partition_params(c.original, c.p, new)
            if strict else new)
  langs = c.score(params)
  forget_tokens = streams.scored_tokens(forget)
  retain_tokens = streams.scored_tokens(retain) if coeffs[2] else 0
  cost = metrics.UnlearningCost(
      steps=ft_config.steps, train_tokens=forget_tokens + retain_tokens,
      forward_tokens=(forget_tokens if coeffs[1] else 0)
      + (attribution_tokens if method == "trace" else 0),
      active_params=active)
  extra = {"final_forget_nll": history["forget_nll"][-1],
           "final_retain_nll": history["retain_nll"][-1],
           "learning_rate": ft_config.learning_rate}
  return method, langs, cost, extra


def _check_finite(run: str, method: str, langs) -> None:
  bad = {code: r for code, r in langs.items()
         if not (math.isfinite(r["loss"]) and math.isfinite(r["bpb"]))}
  if bad:
    raise FloatingPointError(f"{run}: method {method!r} left non-finite "
                             f"validation results for {sorted(bad)}; lower "
                             "its learning rate or steps.")


@dataclasses.dataclass(frozen=True)
class ConfigurationResult:
  """What `run_configuration` returns.

  Attributes:
    results: one row per method, in `UnlearningConfig.methods` order.
    languages: per-language validation results of every model: 'original',
      'reference' and each method's.
  """

  results: tuple[metrics.UnlearningResult, ...]
  languages: dict[str, metrics.LanguageResults]


def run_configuration(*, run: str, scheme: partitions.PartitionScheme,
                      spec: TrainSpec, data: DataSpec,
                      config: UnlearningConfig, cache: streams.DataCache,
                      work_dir: str, mesh) -> ConfigurationResult:
  """Trains one configuration, forgets a language with every method.

  Args:
    run: the configuration's name, e.g. 'family4_attention'.
    scheme: its tier-1 partition scheme.
    spec: model, optimizer and training settings.
    data: SeqIO names of the configuration's data.
    config: what to forget and how.
    cache: SeqIO streams shared between configurations.
    work_dir: directory for the original and reference checkpoints (a rerun
      resumes them).
    mesh: device mesh.

  Returns:
    The rows of the trade-off table and the per-language results.
  """
  cfg = spec.model_config
  language_eval.check_moe(cfg)
  code = config.forget_language
  c = _Config(run, scheme, spec, data, config, cache, mesh)
  c.plan = exact.plan(scheme, code, data.task_name)
  active = params_lib.count_params(cfg).active
  c.original, _ = train_model(os.path.join(work_dir, "original"), spec,
                              data.partition_names, cache, mesh)
  vocabulary = seqio.get_mixture_or_task(data.task_name(code)).output_features[
      "targets"].vocabulary
  validation = {x: cache.validation_rows(data.task_name(x))
                for x in languages.CODES}
  c.evaluator = language_eval.LanguageEvaluator(
      cfg, scheme, validation, vocabulary, config.finetune.rows_per_batch,
      c.to_device)
  c.base = c.evaluator.evaluate(c.original)
  comp = compartmentalization(c.base.routing, code, config.top_m)
  reference, exact_row = _reference(c, work_dir, active)
  rows = []
  if "exact" in config.methods:
    rows.append(exact_row)
  forget, retain = _unlearning_batches(c)
  critical, attribution_tokens, attribution_extra = _attribution(
      c, forget, retain)
  if "mask" in config.methods:
    rows.append(("mask", c.score(c.original, ~critical),
                 metrics.UnlearningCost(forward_tokens=attribution_tokens,
                                        active_params=active),
                 attribution_extra))
  for method in config.methods:
    if method in finetune_loop.METHODS:
      rows.append(_gradient_method(c, method, forget, retain, critical,
                                   active, attribution_tokens))
  results, per_language = [], {"original": c.base.languages,
                                "reference": reference}
  for method, langs, cost, extra in rows:
    per_language[method] = langs
    _check_finite(run, method, langs)
    results.append(metrics.UnlearningResult(
        run=run, method=method, forget_language=code,
        forget=metrics.forget_quality(code, langs, c.base.languages,
                                      reference),
        utility=metrics.utility(code, langs, c.base.languages), cost=cost,
        extra={"scheme": scheme.name, "num_partitions": cfg.num_partitions,
               "sharing": cfg.sharing, "forget_partition": c.p, **comp,
               **extra}))
    logging.info("%s %s: %s", run, method, results[-1].to_row())
  return ConfigurationResult(tuple(results), per_language)
