"""Evaluation: per-language LM metrics, inference routing and SeqIO's path.

`python -m tiered_routing.eval` runs the eval binary (`cli.eval`).

Modules:
  language_eval   the one per-language evaluator (loss, bits per byte,
                  routing) of any parameters.
  lm_metrics      token loss, perplexity and bits per byte from sums.
  routing_counts  expert use per (language, MoE layer, expert).
  scoring         every partition's log-probabilities of the same rows.
  decoding        text generation from one tier-1 partition (the generate
                  binary, verbatim-memory audits).
  routed_eval     evaluation under tier-1 inference routing modes.
  seqio_eval      `seqio.Evaluator` with a model score_fn.
  seqio_metrics   the tasks' SeqIO score metric fns.
"""
