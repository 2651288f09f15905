"""T5X-style gin flags shared by the binaries.

--gin_file=gin/quickstart.gin          (repeatable; later files win)
--gin_bindings="TRAIN_STEPS = 100"     (repeatable; applied after files)
--gin_search_paths=.,/path/to/repo     (where `--gin_file` and `include`
                                        paths are looked up)
--gin.MODEL_DIR="'/tmp/run'"           (shorthand for a binding; the value
                                        is a gin literal, so strings need
                                        their own quotes)
"""

import difflib
import os
import re
from typing import Iterable, Sequence

from absl import app
from absl import flags
import gin
import tensorflow as tf

from tiered_routing.train import atomic_file

# The repository root when running from a source checkout (holds gin/).
REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
_GIN_PREFIX = "--gin."
_UNSET_REQUIRED = re.compile(
    r"(\w+)/macro\.value set to `%gin\.REQUIRED` but not subsequently "
    r"overridden"
)

flags.DEFINE_multi_string("gin_file", [], "gin config files, in order.")
flags.DEFINE_multi_string(
    "gin_bindings", [], "Individual gin bindings, applied after the files."
)
flags.DEFINE_list(
    "gin_search_paths",
    [".", REPO_ROOT],
    "Directories searched for gin files and includes.",
)
flags.DEFINE_bool(
    "multi_host",
    False,
    "Call jax.distributed.initialize() first (TPU pod slices "
    "and multi-process GPU jobs; on TPU VMs it needs no other "
    "flags).",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "jax.distributed coordinator host:port (not on TPU).",
)
flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
flags.DEFINE_integer("process_id", None, "jax.distributed process id.")
# Flags several binaries take, defined once so that every binary can be
# imported in one process (the tests do).
OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    None,
    "Where the binary writes its results (required by the trade-off sweep; "
    "analyze_routing's default is MODEL_DIR/routing).",
)
CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to restore; default the newest."
)

FLAGS = flags.FLAGS


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns every `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith(_GIN_PREFIX):
      name, sep, value = arg[len(_GIN_PREFIX) :].partition("=")
      if not sep or not name:
        raise app.UsageError(
            f"{arg!r} must look like --gin.NAME=VALUE, e.g. "
            "--gin.MODEL_DIR=\"'/tmp/run'\"."
        )
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser that understands `--gin.NAME=VALUE`."""
  return app.parse_flags_with_usage(rewrite_gin_args(argv))


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() if --multi_host (before any jax use)."""
  if not FLAGS.multi_host:
    return
  import jax  # pylint: disable=g-import-not-at-top

  # CPU devices of several processes need a collectives library to run one
  # program together (the two-process test on localhost); it changes
  # nothing on TPU or GPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
  )


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str],
    required_macros: Sequence[str] = (),
) -> None:
  """Parses gin files and bindings; names missing macros clearly.

  Args:
    gin_files: files, resolved through `search_paths`.
    gin_bindings: bindings applied after the files.
    search_paths: directories for files and `include` statements.
    required_macros: macros that must be bound (to anything but
      `%gin.REQUIRED`).

  Raises:
    ValueError: if no gin file is given or a required macro is missing.
  """
  if not gin_files:
    raise ValueError("No --gin_file given; e.g. --gin_file=gin/quickstart.gin")
  for path in search_paths:
    gin.add_config_file_search_path(path)
  try:
    gin.parse_config_files_and_bindings(
        gin_files, gin_bindings, finalize_config=False
    )
    gin.finalize()
  except ValueError as e:
    match = _UNSET_REQUIRED.search(str(e))
    if match:
      raise ValueError(_missing_message(match.group(1))) from e
    raise
  for name in required_macros:
    try:
      gin.query_parameter(f"%{name}")
    except ValueError:
      raise ValueError(_missing_message(name)) from None
  check_macros_used(gin_files, gin_bindings, search_paths, required_macros)


_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", re.MULTILINE)
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_]\w*)")
_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")


def _gin_texts(files: Iterable[str], search_paths: Sequence[str]):
  """The text of every gin file and of every file they include."""
  seen, pending = set(), list(files)
  while pending:
    name = pending.pop()
    path = next(
        (os.path.join(d, name) for d in ("",) + tuple(search_paths)
         if tf.io.gfile.exists(os.path.join(d, name))), None)
    if path is None or path in seen:
      continue
    seen.add(path)
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
    pending.extend(_INCLUDE.findall(text))
    yield text


def check_macros_used(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str],
    required_macros: Sequence[str] = (),
) -> None:
  """Raises ValueError for a macro bound on the command line that nothing
  uses: gin accepts `--gin.TRAIN_STEP=20` (for TRAIN_STEPS) and the run
  silently trains the file's value.

  A macro counts as used when a loaded gin file (includes followed) or a
  binding refers to it as %NAME, or the binary requires it.
  """
  used = set(required_macros)
  for text in list(_gin_texts(gin_files, search_paths)) + list(gin_bindings):
    used.update(_MACRO_REFERENCE.findall(text))
  for binding in gin_bindings:
    match = _MACRO_BINDING.match(binding)
    if match and match.group(1) not in used:
      name = match.group(1)
      close = difflib.get_close_matches(name, sorted(used), n=3)
      hint = f" Did you mean {' or '.join(close)}?" if close else ""
      raise ValueError(
          f"The gin macro {name} (--gin.{name}) is not used by any loaded "
          f"gin file, so it would change nothing.{hint}")


def parse_command_line(
    argv: Sequence[str],
    required_macros: Sequence[str] = (),
    extra_bindings: Sequence[str] = (),
) -> None:
  """What a gin binary's `main` does first: check argv, parse the gin flags.

  Args:
    argv: `main`'s argv (only the program name is allowed).
    required_macros: as in `parse_gin`.
    extra_bindings: bindings applied before --gin_bindings (which win).

  Raises:
    app.UsageError: on positional arguments.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  parse_gin(
      FLAGS.gin_file,
      list(extra_bindings) + list(FLAGS.gin_bindings),
      FLAGS.gin_search_paths,
      required_macros,
  )


def _missing_message(name: str) -> str:
  example = {
      "MODEL_DIR": "\"'/tmp/my_run'\"",
      "TRAIN_STEPS": "1000",
      "BATCH_SIZE": "64",
      "TASK_FEATURE_LENGTHS": "\"{'targets': 512}\"",
      "MIXTURE_OR_TASK_NAME": (
          "\"['tr.sample.family2.p0_v1', " "'tr.sample.family2.p1_v1']\""
      ),
  }
  return (
      f"The gin macro {name} is required but not set. Set it in a gin "
      f"file or with --gin.{name}={example.get(name, 'VALUE')}."
  )


def write_config(model_dir: str, filename: str = "config.gin") -> str:
  """Writes the operative gin config to model_dir/filename atomically.

  Only process 0 writes (call after the configured objects are built, so the
  operative config lists every value that was used).

  Returns:
    The config text.
  """
  import jax  # pylint: disable=g-import-not-at-top

  text = gin.operative_config_str()
  if jax.process_index() != 0:
    return text
  tf.io.gfile.makedirs(model_dir)
  atomic_file.write_text(os.path.join(model_dir, filename), text)
  return text


def mixture_names(mixture_or_task_name, num_partitions: int) -> list[str]:
  """One task or mixture name per partition.

  Args:
    mixture_or_task_name: a name (only with one partition) or a sequence of
      `num_partitions` names, partition p's first.
    num_partitions: P of the model.
  """
  if isinstance(mixture_or_task_name, str):
    names = [mixture_or_task_name]
  else:
    names = list(mixture_or_task_name)
  if len(names) != num_partitions or not all(isinstance(n, str) for n in names):
    raise ValueError(
        f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} must be a list of "
        f"num_partitions={num_partitions} names (one mixture per partition, "
        "e.g. @seqio_names.partition_mixture_names()); a single name "
        "works only with one partition."
    )
  return names


def check_scheme(scheme, num_partitions: int) -> None:
  """SCHEME and the model must agree on the number of partitions."""
  if scheme.num_partitions != num_partitions:
    raise ValueError(
        f"The partition scheme {scheme.name!r} has {scheme.num_partitions} "
        f"partitions but the model has num_partitions={num_partitions}; set "
        "NUM_PARTITIONS once for both."
    )


def task_feature_length(task_feature_lengths) -> int:
  """L from TASK_FEATURE_LENGTHS = {'targets': L} (decoder-only)."""
  if not isinstance(task_feature_lengths, dict) or set(
      task_feature_lengths
  ) != {"targets"}:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS={task_feature_lengths!r} must be "
        "{'targets': L} for this decoder-only model."
    )
  return int(task_feature_lengths["targets"])
