"""Analysis of trained models: routing statistics and plots.

Modules:
  routing_stats  language x expert usage, routing entropy, top-m coverage,
                 mutual information, Jensen-Shannon divergence,
                 compartmentalization of one language.
  plots          PNG heatmaps of usage and divergence matrices.
  restore        params of a trained MODEL_DIR onto the current devices.
  report         per-layer, per-language statistics -> CSV, JSON, PNGs.
  checkpoint_analysis
                 restore + per-language validation routing + report (the
                 library side of scripts/analyze_routing.py).
"""
