"""Unlearning a language: exact (SISA), expert masking, gradient and TRACE.

Modules:
  sweep               the trade-off sweep: configurations, run and resume.
  runner              one configuration, every method.
  configuration       a trained configuration as an immutable record.
  methods             the methods applied to a trained configuration.
  specs               what to train, forget and from which data (records).
  exact               SISA bookkeeping for strict partitions.
  expert_attribution  forget-critical experts from routing statistics and the
                      router masks that remove them.
  objectives          GA, GradDiff and NPO losses over per-token
                      log-likelihoods.
  trace               TRACE: retain-token reweighting by critical-expert use.
  combined_objective  one objective for the gradient methods; a method is a
                      record of its coefficients.
  gradient_methods    the gradient methods run in the one training loop.
  tradeoff_metrics    forget quality, utility, cost; `UnlearningResult`.
  sweep_report        results.csv / .md, the Pareto plot, the manifest.
  relearning_plot     relearning.csv (the attacks' curves, long format) and
                      the relearning curves plots.
"""
