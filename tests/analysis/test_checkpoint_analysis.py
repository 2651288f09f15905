"""The checkpoint analysis reproduces a routing pattern planted by hand.

The model is built so that its routing is known exactly: attention and
expert outputs are zero, so every MoE layer's router sees the RMS-normalized
token embedding; language i's one token embeds as the unit vector e_i, and
router kernel row i of layer m puts a large logit on the planted expert.
With top-1 routing every token of a language lands on that expert, so the
statistics have golden values: top-1 coverage 1, entropy 0, usage = tokens
on the planted global expert, JS 0 for languages sharing an expert and 1
bit otherwise, and the MI of a deterministic map onto 8 global experts of
2 languages each: log2(8) = 3 bits (2 bits within a partition).
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from tiered_routing import sharding
from tiered_routing.analysis import checkpoint_analysis
from tiered_routing.analysis import routing_report
from tiered_routing.data import corpora
from tiered_routing.eval import routing_counts
from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.train import checkpoints
from tiered_routing.train import restore

P, E, D, L, ROWS = 2, 4, 16, 8, 2
FIRST_TOKEN = 4  # language i speaks only token FIRST_TOKEN + i
CONFIG = decoder_config.DecoderConfig(
    vocab_size=32,
    d_model=D,
    num_heads=2,
    head_dim=8,
    num_layers=2,
    num_experts=E,
    expert_d_ff=8,
    top_k=1,
    moe_every=1,
    num_partitions=P,
    sharing="none",
    group_size=64,
    dispatch="reference",
)
SCHEME = schemes.family(P)


def _planted_expert(layer: int, code: str) -> int:
  """Local expert of language `code` in MoE layer `layer`."""
  j = SCHEME.languages_of(SCHEME.partition_of(code)).index(code)
  return j % E if layer == 0 else j // 2


def _planted_params():
  mesh = sharding.make_mesh(
      sharding.MeshConfig(), devices=jax.devices()[:1]
  )
  abstract = restore.abstract_params(CONFIG, mesh)
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
  dec = params["decoder"]
  for name, sub in dec.items():
    if name.startswith("layers_"):
      sub["pre_attention_norm"]["scale"][:] = 1.0
      sub["pre_mlp_norm"]["scale"][:] = 1.0
  dec["decoder_norm"]["scale"][:] = 1.0
  for code in languages.CODES:
    i, q = languages.language_id(code), SCHEME.partition_of(code)
    dec["token_embed"]["embedding"][q, FIRST_TOKEN + i, i] = 1.0
    for m in range(2):
      kernel = dec[f"layers_{m}"]["moe"]["router"]["kernel"]
      kernel[q, i, _planted_expert(m, code)] = 5.0
  return params


def _validation():
  rows = {}
  for code in languages.CODES:
    i = languages.language_id(code)
    ones = np.ones((ROWS, L), np.int32)
    rows[code] = {
        "decoder_input_tokens": ones * (FIRST_TOKEN + i),
        "decoder_target_tokens": ones * (FIRST_TOKEN + i),
        "decoder_loss_weights": ones,
        "decoder_language_ids": ones * i,
        "decoder_segment_ids": ones,
        "decoder_positions": ones * np.arange(L, dtype=np.int32),
    }
  return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("planted"))
  # Saved from one device, as a trainer on another machine would leave it.
  params = jax.device_put(_planted_params(), jax.devices()[0])
  with checkpoints.Checkpointer(
      os.path.join(path, "checkpoints"), async_save=False
  ) as ckpt:
    ckpt.save(7, {"params": params, "step": jnp.int32(7)}, force=True)
  return path


def test_restore_onto_all_devices(model_dir):
  step, params = restore.restore_params(model_dir, CONFIG)
  assert step == 7
  kernel = params["decoder"]["layers_1"]["moe"]["router"]["kernel"]
  assert len(kernel.sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(
      kernel,
      _planted_params()["decoder"]["layers_1"]["moe"]["router"]["kernel"],
  )
  _, untyped = restore.restore_params(model_dir)  # no config: replicated
  np.testing.assert_array_equal(
      untyped["decoder"]["token_embed"]["embedding"],
      params["decoder"]["token_embed"]["embedding"],
  )


def test_restore_bad_inputs(model_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    restore.restore_params(str(tmp_path))
  with pytest.raises(ValueError, match=r"checkpoint_step=3 .*allowed: \[7\]"):
    restore.restore_params(model_dir, CONFIG, step=3)
  bigger = decoder_config.DecoderConfig(**{**CONFIG.__dict__, "d_model": 32})
  with pytest.raises(ValueError, match="shape"):
    restore.restore_params(model_dir, bigger)


def test_analysis_reproduces_planted_routing(model_dir, tmp_path):
  vocabulary = seqio.SentencePieceVocabulary(corpora.UDHR16.vocab_path())
  out = str(tmp_path / "out")
  report, paths = checkpoint_analysis.analyze_checkpoint(
      model_dir, CONFIG, SCHEME, _validation(), vocabulary, out, top_m=1
  )
  assert report.metadata["step"] == 7
  for s in report.layers:
    want = np.zeros((16, P * E))
    for code in languages.CODES:
      q = SCHEME.partition_of(code)
      want[
          languages.language_id(code), q * E + _planted_expert(s.layer, code)
      ] = (ROWS * L)
    np.testing.assert_array_equal(s.usage_NxE, want)
    np.testing.assert_array_equal(s.top_m_coverage_N, 1.0)
    np.testing.assert_array_equal(s.normalized_entropy_N, 0.0)
    np.testing.assert_array_equal(s.top_expert_N, want.argmax(axis=1))
    assert s.mi_bits == pytest.approx(3.0)
    np.testing.assert_allclose(s.mi_within_partition_bits_P, [2.0, 2.0])
    same = want.argmax(axis=1)[:, None] == want.argmax(axis=1)[None, :]
    np.testing.assert_allclose(s.js_NxN, np.where(same, 0.0, 1.0), atol=1e-12)

  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 16
  ur = next(r for r in rows if r["language"] == "ur" and r["layer"] == "1")
  j = SCHEME.languages_of(1).index("ur")
  assert int(ur["top_expert"]) == E + j // 2
  assert float(ur["top_m_coverage"]) == 1.0
  assert int(ur["tokens"]) == ROWS * L
  assert np.isfinite(float(ur["loss"])) and float(ur["bits_per_byte"]) > 0
  with open(paths["json"]) as f:
    doc = json.load(f)
  assert doc["layers"][0]["mutual_information_bits"] == pytest.approx(3.0)
  assert doc["layers"][1]["js_divergence_bits"][0][1] == pytest.approx(0.0)
  for key in ("usage_png", "js_png_0", "js_png_1"):
    with open(paths[key], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out)) == sorted(
      [
          routing_report.CSV_NAME,
          routing_report.JSON_NAME,
          routing_report.USAGE_PNG,
      ]
      + [routing_report.js_png_name(m) for m in range(2)]
  )


def test_report_bad_top_m():
  counts = routing_counts.RoutingCounts(2, P * E)
  with pytest.raises(ValueError, match=r"top_m=5; allowed: 1..4"):
    routing_report.build_report(counts, CONFIG, SCHEME, top_m=5)
