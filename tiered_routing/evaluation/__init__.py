"""Evaluation: loss / perplexity / bits-per-byte metrics and tier-1 routing.

Modules:
  metrics            per-language loss, perplexity and bits per byte; SeqIO
                     score metric functions.
  classifier         c-BTM-style tf-idf nearest-centroid language router.
  inference_routing  oracle, classifier and ensemble tier-1 routing at
                     inference time.
"""
