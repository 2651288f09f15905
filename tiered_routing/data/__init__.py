"""Data: SeqIO tasks' examples to model batches, and the embedded corpora.

Modules:
  pipeline      the feature converter and the [P, B/P, L] input pipeline.
  eval_data     whole evaluation splits, once each, laid out by partition.
  stream_cache  SeqIO streams of the trade-off sweep, built once.
  feature_rows  host-side padding, stacking and regrouping of batches.
  seqio_names   permanent task and mixture names; mixture registration.
  corpora       the embedded UDHR-16 corpus and its SentencePiece model.
"""
