"""Evaluation: loss / perplexity / bits-per-byte metrics and tier-1 routing.

Modules:
  metrics            per-language loss, perplexity and bits per byte; SeqIO
                     score metric functions and their target postprocessor.
  classifier         c-BTM-style tf-idf nearest-centroid language router.
  inference_routing  oracle, classifier and ensemble tier-1 routing at
                     inference time (the math, on log-probabilities).
  scoring            every partition's log-probabilities of the same rows.
  routed_eval        whole-split evaluation under each routing mode: loss,
                     bits per byte, routing accuracy, cost vs the oracle.
  seqio_eval         seqio.Evaluator with a model score_fn; evaluation data.
"""
