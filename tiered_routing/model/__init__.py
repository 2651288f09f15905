"""Flax (linen) decoder-only MoE transformer with the two-tier router.

Modules:
  decoder_config   `DecoderConfig`, validated when built.
  transformer      `TieredDecoder`: blocks, sharing levels, expert masks.
  moe              router -> dispatch -> experts -> combine, per group.
  routing          token-choice, expert-choice and hash routers; the
                   per-token `RouterOutput` contract.
  sequence_gates   expert-owned sequence gates (experts can be added or
                   removed).
  router_registry  the one list of router kinds.
  dispatch         einsum, sort-gather, ragged and reference dispatch.
  layers           embedding, RMSNorm, rotary attention, MLP.
  losses           cross-entropy, router losses, per-language sums.
  routing_capture  every token's routing, captured from a forward pass.
  forward          the one forward pass every caller uses.
  param_count      total and active parameters of a config.
  expert_params    per-expert views of stacked expert parameters.
"""
