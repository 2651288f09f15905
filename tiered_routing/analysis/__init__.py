"""Analysis of trained models: routing statistics, reports and plots.

Modules:
  routing_stats        language x expert usage, routing entropy, top-m
                       coverage, mutual information, Jensen-Shannon
                       divergence, compartmentalization of one language.
  plots                PNG heatmaps of usage and divergence matrices.
  routing_report       per-layer, per-language statistics -> CSV, JSON,
                       PNGs.
  checkpoint_analysis  restore + per-language validation routing + report
                       (the library side of `cli.analyze_routing`).
"""
