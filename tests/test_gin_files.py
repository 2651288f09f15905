"""Every gin file under gin/ parses and builds its model (abstractly).

Files that include a model or pretrain.gin are parsed on their own. The rest
(run pieces such as runs/eval.gin and second-stage files of binaries) are
parsed after gin/quickstart.gin, which supplies the model and the data
macros. Every binary is imported, so every binding of every file is checked
against a registered configurable, and the experiment files of the
related-method binaries bind every required argument.
"""

import glob
import inspect
import os
import re

import gin
import jax
import pytest
import seqio

from tiered_routing import sharding
from tiered_routing.cli import add_expert
from tiered_routing.cli import configurables
# pylint: disable-next=unused-import  (registers eval_script.evaluate)
from tiered_routing.cli import eval as eval_binary
from tiered_routing.cli import finetune_experts
from tiered_routing.cli import gin_flags
from tiered_routing.cli import moefy
from tiered_routing.cli import tradeoff  # pylint: disable=unused-import
from tiered_routing.cli import train as train_binary
from tiered_routing.model import decoder_config
from tiered_routing.model import transformer
from tiered_routing.tier1 import schemes
from tiered_routing.train import train_state

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(
    os.path.relpath(p, REPO_ROOT)
    for p in glob.glob(
        os.path.join(REPO_ROOT, "gin", "**", "*.gin"), recursive=True
    )
)
BASE = "gin/quickstart.gin"


def _read(path):
  with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
    return f.read()


def _self_contained(path):
  text = _read(path)
  return path.startswith("gin/models/") or (
      "include 'gin/models/" in text
      or "include 'gin/runs/pretrain.gin'" in text
  )


@pytest.fixture(autouse=True)
def _clean(clean_gin):
  del clean_gin
  yield


def _parse(files, bindings=()):
  for path in (".", REPO_ROOT):
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(
      files, list(bindings), finalize_config=False
  )


def _build_model(config: decoder_config.DecoderConfig):
  """Abstract parameters and shardings on one device (no allocation)."""
  model = transformer.TieredDecoder(config)
  mesh = sharding.make_mesh(
      sharding.MeshConfig(data=1), devices=jax.devices()[:1]
  )
  seq = min(config.group_size, 64)
  return train_state.param_layout(model, mesh, (config.num_partitions, 1, seq))


def test_found_the_gin_files():
  assert "gin/quickstart.gin" in GIN_FILES
  assert {"gin/runs/pretrain.gin", "gin/runs/eval.gin"} <= set(GIN_FILES)
  levels = {
      re.search(r"^SHARING = '(\w+)'", _read(p), re.M).group(1)
      for p in GIN_FILES
      if p.startswith("gin/experiments/sample_")
      and re.search(r"^SHARING = ", _read(p), re.M)
  }
  assert {"none", "attention", "all"} <= levels


@pytest.mark.parametrize("path", GIN_FILES)
def test_parses_and_builds_model(path):
  first = _read(path).lstrip().splitlines()[0]
  assert first.startswith("#"), f"{path} must open with a comment"
  files = [path] if _self_contained(path) else [BASE, path]
  _parse(files, ["MODEL_DIR = '/tmp/unused'"])
  config = configurables.DecoderConfig()
  _, abstract, shardings = _build_model(config)
  assert jax.tree.structure(abstract) == jax.tree.structure(shardings)
  for script in ("train_script.train", "eval_script.evaluate"):
    try:
      args = gin.get_bindings(script)
    except ValueError:  # Not bound by these files.
      continue
    if not args:
      continue
    assert args["model_config"] == config
    scheme = args["scheme"]
    assert isinstance(scheme, schemes.PartitionScheme)
    assert scheme.num_partitions == config.num_partitions
    names = args["mixture_or_task_name"]
    assert len(names) == config.num_partitions
    for name in names:
      assert name in seqio.MixtureRegistry.names(), name
    assert args["batch_size"] % config.num_partitions == 0


@pytest.mark.parametrize(
    "path",
    [p for p in GIN_FILES if "include 'gin/runs/" "pretrain.gin'" in _read(p)],
)
def test_runnable_files_need_only_model_dir(path):
  _parse([path], ["MODEL_DIR = '/tmp/unused'"])
  gin.finalize()
  for name in train_binary.REQUIRED_MACROS:
    gin.query_parameter(f"%{name}")
  args = gin.get_bindings("train_script.train")
  assert args["train_config"].train_steps >= 1
  assert args["optimizer_config"].learning_rate > 0


def test_quickstart_is_tiny_family4_none():
  _parse([BASE], ["MODEL_DIR = '/tmp/unused'"])
  args = gin.get_bindings("train_script.train")
  config = args["model_config"]
  assert (config.num_partitions, config.sharing) == (4, "none")
  assert config.vocab_size == 4096 and config.d_model <= 128
  assert args["scheme"] == schemes.family(4)
  assert args["train_config"].train_steps <= 500


@pytest.mark.parametrize(
    "binary,scope,files",
    [
        (
            add_expert,
            "expert_gates_script.run",
            ["gin/experiments/expert_gates.gin"],
        ),
        (
            moefy,
            "moefy_script.run",
            ["gin/experiments/moefication.gin", "gin/experiments/moefy.gin"],
        ),
        (
            finetune_experts,
            "finetune_script.run",
            ["gin/experiments/esft.gin", "gin/experiments/finetune.gin"],
        ),
    ],
)
def test_method_gin_files_bind_every_required_argument(binary, scope, files):
  # gin checks every bound name against the signature; every required
  # argument of the binary's entry function must be bound too.
  gin_flags.parse_gin(
      files, ["MODEL_DIR = '/tmp/unused'"], [REPO_ROOT], binary.REQUIRED_MACROS
  )
  signature = inspect.signature(binary.run)
  required = [
      n for n, p in signature.parameters.items() if p.default is gin.REQUIRED
  ]
  assert required
  for name in required:
    assert gin.query_parameter(f"{scope}.{name}") is not None
