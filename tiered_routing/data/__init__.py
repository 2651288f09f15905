"""Data: SeqIO tasks' examples to model batches, and the embedded corpora.

Modules:
  pipeline      the feature converter and the [P, B/P, L] input pipeline.
  eval_data     whole evaluation splits, once each, laid out by partition.
  stream_cache  SeqIO streams of the trade-off sweep, built once.
  feature_rows  host-side padding, stacking and regrouping of batches.
  seqio_names   permanent task and mixture names; mixture registration.
  corpora       the embedded corpora (UDHR-16, debian16), their fixed
                splits and SentencePiece models.
  source_blocks debian16's source blocks and held-out runs of lines.
"""
