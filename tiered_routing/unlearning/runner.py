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
                 nothing), and so is the reference: the partition retrained
                 on no data would be its random initialisation, whose random
                 logits score *worse* than uniform, which would make a
                 perfect forget look partial.
  mask           experts the forget language depends on (attribution from
                 forget vs retain routing on training data,
                 `expert_attribution`) are masked out of its partition's
                 router, layer by layer; no training.
  ga, graddiff, npo, trace
                 `gradient_methods` steps on forget batches (the language's own
                 task) and retain batches (the reference model's training
                 streams: the other languages of the forget partition under
                 sharing 'none', all other languages otherwise).

Every method's model is then audited beyond mean loss (`forget_audits`:
membership inference and PrivLeak, verbatim continuation, int8 / int4
round trips, routing shift), with the reference as the zero point.

Results are scored per language on the validation split
(`eval.language_eval`); the forget language's compartmentalization (top-m
routing
mass, normalized entropy, language-expert mutual information) comes from the
trained model's validation routing and is added to every row.
"""

import dataclasses
import math

from absl import logging

from tiered_routing.analysis import routing_stats
from tiered_routing.data import stream_cache
from tiered_routing.model import param_count
from tiered_routing.tier1 import schemes
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import forget_audits
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import mask_method
from tiered_routing.unlearning import methods
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import tradeoff_metrics


@dataclasses.dataclass(frozen=True)
class ConfigurationResult:
  """What `run_configuration` returns.

  Attributes:
    results: one row per method, in `UnlearningConfig.methods` order.
    languages: per-language validation results of every model: 'original',
      'reference' and each method's.
    audit_seconds: wall time of the audits per family (`forget_audits`);
      kept out of the rows so that a rerun writes the same results.
    audit_cpu_seconds: their CPU time per family.
  """

  results: tuple[tradeoff_metrics.UnlearningResult, ...]
  languages: dict[str, tradeoff_metrics.LanguageResults]
  audit_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  audit_cpu_seconds: dict[str, float] = dataclasses.field(
      default_factory=dict
  )


def _check_finite(run: str, method: str, langs) -> None:
  bad = {
      code: r
      for code, r in langs.items()
      if not (math.isfinite(r["loss"]) and math.isfinite(r["bpb"]))
  }
  if bad:
    raise FloatingPointError(
        f"{run}: method {method!r} left non-finite "
        f"validation results for {sorted(bad)}; lower "
        "its learning rate or steps."
    )


def approximate_rows(c, reference, active) -> list[methods.Row]:
  """The rows of the mask and gradient methods, in `config.methods` order.

  Gradient methods stop at the reference's held-out forget NLL when
  `stop_at_reference` is set. Methods that are the same objective for
  this configuration (no retain data: GA = GradDiff, NPO = NPO+retain =
  TRACE) run once, as one row named 'ga=graddiff' etc."""
  config = c.config
  batches = methods.unlearning_batches(c)
  critical, tokens, attribution_extra = mask_method.attribution(c, batches)
  stop = (
      methods.held_out_stop(c, reference)
      if config.finetune.stop_at_reference
      else None
  )
  has_retain = bool(c.plan.retain_languages) or not c.strict
  gradient = tuple(m for m in config.methods if m in gradient_methods.METHODS)
  groups = {
      g[0]: g
      for g in gradient_methods.identical_by_construction(gradient, has_retain)
  }
  rows = []
  for method in config.methods:
    if method == "mask":
      rows.append(
          mask_method.mask_method(
              c, critical, active, tokens, attribution_extra
          )
      )
    elif method in groups:
      row = methods.gradient_method(
          c, method, batches, critical, active, tokens, stop
      )
      rows.append(row._replace(method="=".join(groups[method])))
  return rows


def _reachable_experts(c: configuration.TrainedConfiguration) -> range:
  """Global ids of the experts the forget language's tokens can reach:
  its partition's E (strict partitions, shared attention), or the whole
  pool of P * E (sharing 'all', routed by tier 2 alone)."""
  cfg = c.spec.model_config
  if cfg.sharing == "all":
    return range(cfg.experts_per_layer)
  e = cfg.num_experts
  return range(c.forget_partition * e, (c.forget_partition + 1) * e)


def run_configuration(
    *,
    run: str,
    scheme: schemes.PartitionScheme,
    spec: specs.TrainSpec,
    data: specs.DataSpec,
    config: specs.UnlearningConfig,
    cache: stream_cache.DataCache,
    work_dir: str,
    mesh,
) -> ConfigurationResult:
  """Trains one configuration, forgets a language with every method.

  Args:
    run: the configuration's name, e.g. 'family4_attention'.
    scheme: its tier-1 partition scheme.
    spec: model, optimizer and training settings.
    data: SeqIO names of the configuration's data.
    config: what to forget and how.
    cache: SeqIO streams shared between configurations.
    work_dir: directory for the original and reference checkpoints (a rerun
      restores them).
    mesh: device mesh.

  Returns:
    The rows of the trade-off table and the per-language results.
  """
  c = configuration.prepare(
      run=run, scheme=scheme, spec=spec, data=data, config=config,
      cache=cache, work_dir=work_dir, mesh=mesh,
  )
  return forget(c, work_dir)


def forget(
    c: configuration.TrainedConfiguration, work_dir: str
) -> ConfigurationResult:
  """Forgets `c.config.forget_language` from a prepared configuration with
  every method; the reference's checkpoints go to work_dir/reference."""
  config, spec, scheme = c.config, c.spec, c.scheme
  active = param_count.count_params(spec.model_config).active
  ref = methods.reference_and_exact(c, work_dir, active)
  reference = ref.languages
  rows = [ref.exact_row] if "exact" in config.methods else []
  rows += approximate_rows(c, ref, active)
  code = config.forget_language
  extra = {
      "scheme": scheme.name,
      "num_partitions": spec.model_config.num_partitions,
      "sharing": spec.model_config.sharing,
      "forget_partition": c.forget_partition,
      **routing_stats.compartmentalization_columns(
          c.base_routing, code, config.top_m, _reachable_experts(c)
      ),
  }
  seconds, cpu_seconds = {}, {}
  if config.audits.enabled:
    auditor = forget_audits.Auditor(c, reference, ref.exact_row.model)
    rows = [row._replace(extra={**row.extra, **auditor.columns(row)})
            for row in rows]
    seconds, cpu_seconds = dict(auditor.seconds), dict(auditor.cpu_seconds)
  results = tuple(_result(c, row, reference, extra) for row in rows)
  return ConfigurationResult(
      results,
      {
          "original": c.base,
          "reference": reference,
          **{row.method: row.languages for row in rows},
      },
      seconds,
      cpu_seconds,
  )


def _result(
    c: configuration.TrainedConfiguration, row: methods.Row, reference, extra
) -> tradeoff_metrics.UnlearningResult:
  """A method's row of the trade-off table."""
  code = c.config.forget_language
  _check_finite(c.run, row.method, row.languages)
  result = tradeoff_metrics.UnlearningResult(
      run=c.run,
      method=row.method,
      forget_language=code,
      forget=tradeoff_metrics.forget_quality(
          code,
          row.languages,
          c.base,
          reference,
          uniform_loss=math.log(c.spec.model_config.vocab_size),
      ),
      utility=tradeoff_metrics.utility(
          code,
          row.languages,
          c.base,
          c.scheme.partitions[c.forget_partition],
      ),
      cost=row.cost,
      extra={**extra, **row.extra},
  )
  logging.info("%s %s: %s", c.run, row.method, result.to_row())
  return result
