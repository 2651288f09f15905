"""Analysis of trained models: routing statistics and plots.

Modules:
  routing_stats  language x expert usage, routing entropy, top-m coverage,
                 mutual information, Jensen-Shannon divergence,
                 compartmentalization of one language.
  plots          PNG heatmaps of usage and divergence matrices.
"""
