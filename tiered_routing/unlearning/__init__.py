"""Unlearning a language: exact (SISA), expert masking, gradient and TRACE.

Modules:
  objectives          GA, GradDiff and NPO losses over per-token
                      log-likelihoods.
  expert_attribution  forget-critical experts from routing statistics and the
                      router masks that remove them.
  token_routing       every token's routing, captured from a forward pass.
  trace               TRACE: retain-token reweighting by critical-expert use.
  metrics             forget quality, utility, cost; `UnlearningResult`.
  exact               SISA bookkeeping for strict partitions.
"""
