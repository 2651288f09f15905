"""tiered_routing: Mixture-of-Experts language models with tiered routing.

Tier 1 is a fixed lookup from a sample's language to a strict partition; tier 2
is learned top-k token gating inside a partition. Nothing is registered at
import time: gin files import the task modules they need.

The package is layered; a module imports its own package and lower layers
only (tests/test_layering.py enforces it):

  sharding, tier1   the device mesh and logical-axis rules; languages,
                    partition schemes, the [P, B/P, L] layout, one partition
                    as a model, inference routing and its classifier
  model             config, transformer, MoE, routers (one registry),
                    dispatch, losses, routing capture, the one forward pass
  data              feature converter, input pipelines, evaluation data,
                    task names, the embedded corpora
  train             state, the one step, the one loop, the checkpointed
                    trainer, optimizers, checkpoints and restore, metrics
  eval              LM metrics, the one per-language evaluator, routed and
                    SeqIO evaluation
  analysis          routing statistics, reports, plots
  unlearning,       the trade-off sweep: exact, attribution, objectives,
  related           TRACE, methods; ESFT, expert gates, MoEfication, decoding
  cli               the gin binaries, their flags and gin registrations

Shape letters, one alphabet for the whole package (an array's name ends in
its shape, e.g. `tokens_PxBxL`, `expert_index_MxTxK`):

  P tier-1 partitions      B rows (of a partition's block)   L sequence length
  D model width            F feed-forward (expert) width     V vocabulary
  H attention heads        Q width per head                  T tokens
  E experts (per layer)    K expert slots per token (top-k)  C expert capacity
  G routing groups         S tokens per group                M MoE layers
  N languages              R routed slots (T * K, sorted)    Z sequences
  I steps (batches)        X, Y any other width
"""

__version__ = "0.1.0"
