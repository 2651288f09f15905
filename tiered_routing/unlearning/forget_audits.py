"""Attacks and audits of every unlearned model, beyond mean validation loss.

Mean loss on held-out text says how much worse a model predicts the
language; it does not say whether the training text can still be
recognised, recited, or recovered. Following MUSE (Shi et al. 2024, arXiv
2407.06460), TOFU (Maini et al. 2024) and the quantization attack of Zhang
et al. 2024 (arXiv 2410.16454), every method's model (`methods.Model`) and
the never-saw-it reference are put through:

  mia_*, privleak_*  membership inference on the forget language's training
                     paragraphs against its held-out paragraphs
                     (`membership_inference`), PrivLeak against the
                     reference; `mia_retain_auc_minkpp` is the same test on a
                     retained language (it should not move).
  verbmem_*          greedy continuation of training-paragraph prefixes
                     (`verbatim_memory`).
  quant_int{8,4}_*   the forget loss, gap closed and retained-loss change
                     after a round trip of the weights (`weight_quantization`):
                     does rounding undo the unlearning?
  routing_shift_*    Jensen-Shannon divergence (bits, mean over MoE layers)
                     between the original's and the model's expert usage on
                     the held-out paragraphs of the forget and the retained
                     language, and
  routing_replay_*   the forget loss on those paragraphs with the original's
                     routing replayed through the model's weights
                     (`routing_capture.replay_mask`): did a method forget, or
                     route around the experts that hold the language (GRIP,
                     arXiv 2601.16905)? Rerouting shows as a large JS and a
                     replayed loss well below the model's own.
  relearn_*          relearning attacks from a few paragraphs of the forget
                     language or of a related one (`relearning`).
  router_classifier_* utility and routing under the classifier router,
                     with a dropped partition switched off: where does
                     the forget language's text go (`router_audit`)?

Exact methods are the zero point: the retrained partition is the reference
(PrivLeak 0 by construction), and a dropped partition has no model, so its
language is scored as the uniform distribution (loss and Min-K%++ AUC 1/2,
nothing recited, nothing to quantize back, nothing to relearn from).
"""

import collections
import contextlib
import math
import time
from typing import Any, Optional

from absl import logging

from tiered_routing.eval import decoding
from tiered_routing.unlearning import audit_scoring
from tiered_routing.unlearning import audit_sets
from tiered_routing.unlearning import membership_inference as mia
from tiered_routing.unlearning import methods
from tiered_routing.unlearning import relearning
from tiered_routing.unlearning import router_audit
from tiered_routing.unlearning import tradeoff_metrics
from tiered_routing.unlearning import verbatim_memory
from tiered_routing.unlearning import weight_quantization

_MIN_PARAGRAPHS = 4


def _attacks(c) -> list[relearning.Attack]:
  """The forget language's budgets, then each related language's."""
  audits, code = c.config.audits, c.config.forget_language
  own = audit_sets.training_paragraphs(c, code)
  sources = [(f"relearn_{b}", own, b) for b in audits.relearn_budgets]
  if audits.relearn_related and audits.relearn_budgets:
    most = max(audits.relearn_budgets)
    for r in audit_sets.related_languages(code):
      sources.append((f"relearn_related_{r}",
                      audit_sets.training_paragraphs(c, r), most))
  out = []
  for name, rows, budget in sources:
    available = len(rows["decoder_target_tokens"])
    if not available:
      continue
    out.append(relearning.Attack(
        name, {k: v[:budget] for k, v in rows.items()},
        audits.relearn_steps, audits.relearn_rows_per_step,
        audits.relearn_learning_rate,
    ))
  return out


class Auditor:
  """Audits the methods' models of one forget unit.

  Built once per (configuration, seed, forget language): it picks the
  paragraph sets and scores the original and the reference, whose numbers
  every row is compared with.

  Args:
    c: the trained configuration (`configuration.TrainedConfiguration`).
    reference: the reference's results (`tradeoff_metrics.LanguageResults`).
    reference_model: its model; None when the partition was dropped.
  """

  def __init__(self, c, reference, reference_model: Optional[methods.Model]):
    self.c, self.reference = c, reference
    # Audit family -> wall seconds, and -> CPU seconds of this process
    # (every thread): wall time also counts waits for other processes and
    # pauses of the machine, CPU time only the work.
    self.seconds = collections.Counter()
    self.cpu_seconds = collections.Counter()
    with self._timed("setup"):
      self._setup(reference_model)

  @contextlib.contextmanager
  def _timed(self, family: str):
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
      yield
    finally:
      self.seconds[family] += time.perf_counter() - start
      self.cpu_seconds[family] += time.process_time() - cpu_start

  def _setup(self, reference_model: Optional[methods.Model]) -> None:
    """Paragraph sets, attacks, and the original's and reference's scores."""
    c = self.c
    audits = c.config.audits
    code = c.config.forget_language
    self.forget = audit_sets.language_sets(c, code)
    self.retained = audit_sets.language_sets(c, audit_sets.retained_language(c))
    self.prompts, self.truths = audit_sets.prompts(
        self.forget, audits.prefix_tokens, audits.continuation_tokens,
        audits.prompts,
    )
    original = methods.Model(c.original)
    self._original_usage = {
        s.code: audit_scoring.token_stats(
            c, original, s.partition, s.non_members
        ).usage
        for s in (self.forget, self.retained)
    }
    self.reference_auc = self._membership(reference_model, self.forget)
    self.attacks = _attacks(c)
    held_out = {k: v[: audits.relearn_eval_rows]
                for k, v in self.forget.non_members.items()}
    self._held_out_rows = held_out
    self._held_out = None
    if len(held_out["decoder_target_tokens"]):
      self._held_out = relearning.held_out_batch(c, held_out)
    else:
      self.attacks = []  # No held-out forget text to measure recovery on.
    self._original_nll = self._served_nll(original)
    self.router = None
    if audits.router_rows:
      self.router = router_audit.ClassifierRouting(
          c, audits.router_rows, audits.router_docs
      )
      self._router_original = self.router.results(c.original)
    self.unit = {
        "mia_paragraphs": self.forget.size,
        "mia_retain_language": self.retained.code,
        "verbmem_prompts": len(self.prompts),
        "mia_auc_minkpp_reference": self.reference_auc["minkpp"],
        "mia_auc_minkpp_original": self._membership(
            original, self.forget
        )["minkpp"],
        "verbmem_rougel_original": self._verbatim(original)["rougel"],
        "verbmem_rougel_reference": self._verbatim(reference_model)["rougel"],
    }

  def _membership(self, model, sets: audit_sets.LanguageSets) -> dict:
    if sets.size < _MIN_PARAGRAPHS:
      return {name: math.nan for name in mia.SCORES}
    c = self.c
    members = audit_scoring.scores(
        c, audit_scoring.token_stats(c, model, sets.partition, sets.members),
        sets.members, sets.member_texts,
    )
    stats = audit_scoring.token_stats(
        c, model, sets.partition, sets.non_members
    )
    non = audit_scoring.scores(
        c, stats, sets.non_members, sets.non_member_texts
    )
    return {
        name: mia.auc(members.get(name), non.get(name)) for name in mia.SCORES
    }

  def _verbatim(self, model) -> dict[str, float]:
    if len(self.prompts) < _MIN_PARAGRAPHS:
      return {"rougel": math.nan, "exact": math.nan, "token_accuracy": math.nan}
    if model is None:  # No model: nothing is recited.
      return {"rougel": 0.0, "exact": 0.0, "token_accuracy": 0.0}
    cfg = model.config or self.c.spec.model_config
    generator = decoding.Generator(
        cfg, model.params, self.forget.partition, model.expert_mask_MxPxE
    )
    sampling = decoding.SamplingConfig(
        max_new_tokens=self.c.config.audits.continuation_tokens
    )
    generated = generator.generate(self.prompts, sampling)
    return verbatim_memory.continuation_scores(generated, self.truths)

  def columns(self, row: methods.Row) -> dict[str, Any]:
    """Every audit column of one method's row (`row.model` None: the
    forget partition was dropped)."""
    model, out = row.model, dict(self.unit)
    with self._timed("membership"):
      out.update(self._privacy(model))
    with self._timed("verbatim"):
      out.update(
          {f"verbmem_{k}": v for k, v in self._verbatim(model).items()}
      )
    with self._timed("routing_shift"):
      out.update(self._routing_shift(model, self._retained_model(model)))
    with self._timed("quantization"):
      for bits in self.c.config.audits.quant_bits:
        out.update(self._quantized(row, bits))
    with self._timed("relearning"):
      out.update(self._relearning(model))
    if self.router is not None:
      with self._timed("classifier_routing"):
        out.update(self._classifier_routed(model))
    logging.info(
        "%s %s audits so far (CPU s): %s", self.c.run, row.method,
        ", ".join(f"{k} {v:.0f}" for k, v in self.cpu_seconds.most_common()),
    )
    return out

  def _retained_model(self, model) -> methods.Model:
    """The model the retained language is served by: the original where
    the forget partition was dropped (the other partitions are intact)."""
    return methods.Model(self.c.original) if model is None else model

  def _privacy(self, model) -> dict[str, float]:
    """Membership-inference AUCs, PrivLeak, and the retained check."""
    out = {}
    auc = self._membership(model, self.forget)
    for name in mia.SCORES:
      out[f"mia_auc_{name}"] = auc[name]
      ref = self.reference_auc[name]
      out[f"privleak_{name}"] = (
          mia.privleak(auc[name], ref) if ref > 0 else math.nan
      )
    out["mia_retain_auc_minkpp"] = self._membership(
        self._retained_model(model), self.retained
    )["minkpp"]
    return out

  def _classifier_routed(self, model) -> dict[str, Any]:
    """Under the classifier router; a dropped partition is switched off."""
    disabled = router_audit.disabled_of(self.c, model)
    served = methods.Model(self.c.original) if model is None else model
    results = self.router.results(
        served.params, disabled, served.expert_mask_MxPxE, served.config
    )
    return router_audit.columns(
        self.router, results, self._router_original, disabled
    )

  def _served_nll(self, model) -> float:
    stats = audit_scoring.token_stats(
        self.c, model, self.forget.partition, self._held_out_rows
    )
    return audit_scoring.mean_nll(stats, self._held_out_rows)

  def _relearning(self, model) -> dict[str, float]:
    """Every relearning attack on the model (`relearning`)."""
    attacked = relearning.attack_model(model)
    start = math.nan if model is None else self._served_nll(model)
    out = {"relearn_start_nll": start,
           "relearn_original_nll": self._original_nll}
    for attack in self.attacks:
      out[f"{attack.name}_paragraphs"] = len(
          attack.rows["decoder_target_tokens"])
      if attacked is None:
        out.update(relearning.nan_summary(attack.name))
        continue
      nll, tokens = relearning.curve(
          self.c, attacked.params, attack, self._held_out
      )
      out.update(relearning.summary(
          attack.name, start, self._original_nll, nll, tokens
      ))
      out[f"{attack.name}_curve"] = " ".join(f"{v:.4f}" for v in nll)
    return out

  def _routing_shift(self, model, retained_model) -> dict[str, float]:
    """JS of expert usage against the original, and the forget loss with
    the original's routing replayed: a method that rerouted rather than
    forgot gets its knowledge back (a negative change)."""
    out = {}
    for name, sets, m in (
        ("forget", self.forget, model),
        ("retain", self.retained, retained_model),
    ):
      stats = None if m is None else audit_scoring.token_stats(
          self.c, m, sets.partition, sets.non_members
      )
      out[f"routing_shift_{name}_js"] = audit_scoring.js_bits(
          self._original_usage[sets.code],
          None if stats is None else stats.usage,
      )
      if name == "forget":
        own = math.nan if stats is None else audit_scoring.mean_nll(
            stats, sets.non_members)
        replay = math.nan if m is None else audit_scoring.replay_nll(
            self.c, m, sets.partition, sets.non_members
        )
        out["routing_replay_forget_loss"] = replay
        out["routing_replay_forget_loss_change"] = replay - own
    return out

  def _quantized(self, row: methods.Row, bits: int) -> dict[str, float]:
    """The row's forget and retained results after a `bits` round trip."""
    c, code = self.c, self.c.config.forget_language
    if row.model is None:
      results = row.languages  # A dropped partition has no weights.
    else:
      params = weight_quantization.round_trip(row.model.params, bits)
      results = c.score(params, row.model.expert_mask_MxPxE, row.model.config)
    forget = tradeoff_metrics.forget_quality(
        code, results, c.base, self.reference,
        uniform_loss=math.log(c.spec.model_config.vocab_size),
    )
    partition = c.scheme.languages_of(c.forget_partition)
    utility = tradeoff_metrics.utility(code, results, row.languages, partition)
    group = "inside" if c.strict else "retain"
    prefix = f"quant_int{bits}"
    return {
        f"{prefix}_forget_loss": forget["forget_loss"],
        f"{prefix}_forget_loss_change": forget["forget_loss"]
        - float(row.languages[code]["loss"]),
        f"{prefix}_gap_closed": forget["forget_gap_closed"],
        f"{prefix}_retain_loss_change": utility[f"{group}_loss_delta"],
    }
