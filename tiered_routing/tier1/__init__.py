"""Tier 1: the fixed lookup from a sample's language to its strict partition.

The only code that knows what a partition scheme is.

Modules:
  languages            the 16 languages of the study and their stable ids.
  schemes              partition schemes (family, random, per-language,
                       custom).
  layout               the [P, B/P, L] batch layout: a token's partition, its
                       global expert ids, tier 1 as an expert mask.
  one_partition        one partition of a strict-partition model as a model.
  inference_routing    oracle, classifier and ensemble routing at inference
                       (the math, on log-probabilities).
  language_classifier  the c-BTM-style tf-idf language router.
"""
