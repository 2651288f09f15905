r"""Generates text from one tier-1 partition of a trained checkpoint.

  python -m tiered_routing.cli.generate --gin_file=gin/quickstart.gin \
      --gin.MODEL_DIR="'/tmp/tr_quickstart'" --language=en \
      --prompt="Everyone has the right" --max_new_tokens=32

--language picks the partition that owns it in the run's SCHEME (or give
--partition directly). --temperature=0 (the default) is greedy; a positive
temperature samples, optionally among the --top_k likeliest tokens, with
--seed. Prompts are encoded with the vocabulary of DATA_SOURCE's tasks;
each prompt is printed with its continuation, up to the first EOS.
Opt-out at inference: `--gin.generate_script.generate.disabled_partitions=
"[2]"` switches partitions off; asking for one of them is refused.
`scripts/generate.py` runs this binary too.
"""

from collections.abc import Sequence
from typing import Optional

from absl import flags
import gin

from tiered_routing import sharding
from tiered_routing.cli import configurables  # pylint: disable=unused-import
from tiered_routing.cli import gin_flags
# The training run's gin files bind train_script.train: register it.
from tiered_routing.cli import train  # pylint: disable=unused-import
from tiered_routing.cli import user_errors
from tiered_routing.data import eval_data
from tiered_routing.data import seqio_names
from tiered_routing.model import decoder_config
from tiered_routing.eval import decoding
from tiered_routing.tier1 import languages
from tiered_routing.tier1 import opt_out
from tiered_routing.tier1 import schemes
from tiered_routing.train import restore

_PROMPTS = flags.DEFINE_multi_string(
    "prompt", [""], "Prompt text (repeatable: one row each)."
)
_LANGUAGE = flags.DEFINE_string(
    "language", None, "Run the partition that owns this language code."
)
_PARTITION = flags.DEFINE_integer("partition", None, "Partition to run.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among k tokens; 0 = all.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

FLAGS = flags.FLAGS
REQUIRED_MACROS = ("MODEL_DIR", "DATA_SOURCE", "SCHEME")
# Bound before --gin_bindings, which can override them.
BINDINGS = (
    "generate_script.generate.model_dir = %MODEL_DIR",
    "generate_script.generate.data_source = %DATA_SOURCE",
    "generate_script.generate.scheme = %SCHEME",
    "generate_script.generate.model_config = @tiered_routing.DecoderConfig()",
)


def resolve_partition(
    scheme: schemes.PartitionScheme,
    language: Optional[str],
    partition: Optional[int],
    disabled_partitions: Sequence[int] = (),
) -> int:
  """The partition of --language and/or --partition (which must agree and
  must not be switched off: `disabled_partitions`, the opt-out)."""
  disabled = opt_out.check_disabled(disabled_partitions, scheme.num_partitions)
  chosen = _resolve(scheme, language, partition)
  if chosen in disabled:
    owner = "" if language is None else f" (--language={language})"
    raise ValueError(
        f"Partition {chosen}{owner} is opted out (disabled_partitions="
        f"{list(disabled)}); partitions on: "
        f"{[p for p in range(scheme.num_partitions) if p not in disabled]}."
    )
  return chosen


def _resolve(scheme, language, partition) -> int:
  if language is None and partition is None:
    raise ValueError(
        "Give --language (one of "
        f"{', '.join(languages.CODES)}) or --partition (0.."
        f"{scheme.num_partitions - 1})."
    )
  if language is not None:
    owner = scheme.partition_of(language)  # ValueError for unknown codes.
    if partition is not None and partition != owner:
      raise ValueError(
          f"--partition={partition} but --language={language} belongs to "
          f"partition {owner} of scheme {scheme.name!r}."
      )
    return owner
  return partition


@gin.configurable("generate", module="generate_script")
def run(
    *,
    model_dir: str = gin.REQUIRED,
    data_source: str = gin.REQUIRED,
    scheme: schemes.PartitionScheme = gin.REQUIRED,
    model_config: decoder_config.DecoderConfig = gin.REQUIRED,
    mesh_config: Optional[sharding.MeshConfig] = None,
    disabled_partitions: Sequence[int] = (),
) -> list[str]:
  """Prints and returns one continuation per --prompt; a partition in
  `disabled_partitions` (opt-out at inference) is refused."""
  partition = resolve_partition(
      scheme, _LANGUAGE.value, _PARTITION.value, disabled_partitions
  )
  sampling = decoding.SamplingConfig(
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      seed=_SEED.value,
  )
  vocabulary = eval_data.vocabulary_of(
      seqio_names.task_name(data_source, scheme.languages_of(partition)[0])
  )
  mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
  step, params = restore.restore_params(
      model_dir, model_config, mesh=mesh, step=gin_flags.CHECKPOINT_STEP.value
  )
  with sharding.with_sharding_rules(mesh):
    generator = decoding.Generator(model_config, params, partition)
    prompt_ids = [vocabulary.encode(p) for p in _PROMPTS.value]
    ids = generator.generate(prompt_ids, sampling)
  texts = []
  print(
      f"{model_dir} step {step}, partition {partition} "
      f"{list(scheme.languages_of(partition))}, {sampling}"
  )
  for prompt, row in zip(prompt_ids, ids):
    # Decoded together: SentencePiece drops the leading space of a text.
    text = vocabulary.decode(
        list(prompt) + decoding.truncate_at_eos(row, vocabulary.eos_id)
    )
    texts.append(text)
    print(f"--- {text}")
  return texts


def main(argv):
  gin_flags.parse_command_line(argv, REQUIRED_MACROS, BINDINGS)
  run()


if __name__ == "__main__":
  user_errors.run(main)
