"""Flax (linen) decoder-only MoE transformer with the two-tier router."""
