"""Tests for model.param_count and the gin model configs."""

import pathlib

import gin

from tiered_routing.cli import configurables
from tiered_routing.model import decoder_config
from tiered_routing.model import param_count

REPO = pathlib.Path(__file__).resolve().parents[2]
MODELS = REPO / "gin" / "models"
SIZES = (1, 2, 4, 8, 16)

# Tiny config: V=32, D=16, 2 heads x 8, layer 0 dense (d_ff 32), layer 1 MoE
# with 4 experts of F=8, gated FFNs, tied embeddings, P=2.
V, D, F_DENSE, E, F, P = 32, 16, 32, 4, 8, 2
EMBED = V * D + D                      # table + final norm
ATTN = 2 * (4 * D * 16 + 2 * D)        # q, k, v, out (H*K = 16) + 2 norms
DENSE = 3 * D * F_DENSE                # wi, wi_gate, wo
ROUTER = D * E
EXPERTS = E * 3 * D * F


def _config(**overrides):
  base = dict(vocab_size=V, d_model=D, num_heads=2, head_dim=8, num_layers=2,
              d_ff=F_DENSE, num_experts=E, expert_d_ff=F, moe_every=2,
              num_partitions=P)
  return decoder_config.DecoderConfig(**{**base, **overrides})


def test_counts_sharing_none():
  one = EMBED + ATTN + DENSE + ROUTER + EXPERTS
  active = one - EXPERTS + EXPERTS * 2 // E
  count = param_count.count_params(_config(sharing="none"))
  assert count == param_count.ParamCount(
      total=P * one, active=active, per_partition_total=one,
      per_partition_active=active, expert=P * EXPERTS)


def test_counts_sharing_attention():
  shared, private = EMBED + ATTN, DENSE + ROUTER + EXPERTS
  active = shared + private - EXPERTS + EXPERTS * 2 // E
  count = param_count.count_params(_config(sharing="attention"))
  assert count == param_count.ParamCount(
      total=shared + P * private, active=active,
      per_partition_total=shared + private, per_partition_active=active,
      expert=P * EXPERTS)


def test_counts_sharing_all_untied():
  # One MoE with P * E experts; untied adds the [D, V] output projection.
  total = EMBED + V * D + ATTN + DENSE + D * P * E + P * EXPERTS
  active = total - P * EXPERTS + P * EXPERTS * 2 // (P * E)
  count = param_count.count_params(_config(sharing="all", tie_embeddings=False))
  assert (count.total, count.active, count.per_partition_total) == (
      total, active, total)
  breakdown = param_count.param_breakdown(_config(sharing="all"))
  assert breakdown["experts"] == P * EXPERTS
  assert breakdown["routers"] == D * P * E
  assert breakdown["embedding"] == V * D


def _parse(path, bindings=()):
  gin.clear_config()
  gin.parse_config_files_and_bindings([str(path)], list(bindings))
  return configurables.DecoderConfig()


def test_every_model_gin_file_parses(clean_gin):
  files = sorted(MODELS.glob("*.gin"))
  assert {f.stem for f in files} >= {"tiny"} | {f"n{n}" for n in SIZES}
  for path in files:
    config = _parse(path)
    assert isinstance(config, decoder_config.DecoderConfig), path
    assert path.read_text().startswith("#"), path
  tiny = _parse(MODELS / "tiny.gin", ["VOCAB_SIZE = 100"])
  assert (tiny.vocab_size, tiny.d_model, tiny.num_layers, tiny.num_experts) == (
      100, 64, 2, 4)


def test_size_configs_match_in_total(clean_gin):
  counts = {}
  for n in SIZES:
    config = _parse(MODELS / f"n{n}.gin")
    assert config.num_partitions == n and config.sharing == "none"
    assert config.num_experts * n == 512 and config.vocab_size == 32000
    counts[n] = param_count.count_params(config)
  reference = counts[1].total
  assert abs(reference - 766e6) / 766e6 < 0.01
  for n, count in counts.items():
    assert abs(count.total - reference) / reference < 0.05, (n, count)
    assert count.per_partition_total * n == count.total
  assert abs(counts[16].per_partition_total - 49e6) / 49e6 < 0.05
