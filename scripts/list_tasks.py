r"""Lists the registered SeqIO tasks and mixtures (what MIXTURE_OR_TASK_NAME
and `--mixture_or_task` accept).

  python scripts/list_tasks.py                    # everything
  python scripts/list_tasks.py --pattern=debian16 # one source
  python scripts/list_tasks.py --pattern='family4\.p'

Importing `tasks` registers the tasks of every source and the default
mixtures (`tasks/mixtures.py`); other partition schemes' mixtures are
registered when a gin file asks for them.
"""

import re

from absl import app
from absl import flags
import seqio

import tasks  # pylint: disable=unused-import  (registers them)
from tiered_routing.cli import user_errors

_PATTERN = flags.DEFINE_string(
    "pattern", "", "Python regular expression the names must contain.")


def listing(pattern: str = "") -> str:
  """'Tasks (n):' and 'Mixtures (n):' blocks of the names matching."""
  try:
    wanted = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"--pattern={pattern!r} is not a regex: {e}") from None
  tasks_ = sorted(n for n in seqio.TaskRegistry.names() if wanted.search(n))
  mixtures = sorted(
      n for n in seqio.MixtureRegistry.names() if wanted.search(n))
  lines = [f"Tasks ({len(tasks_)}):", *(f"  {n}" for n in tasks_),
           f"Mixtures ({len(mixtures)}):"]
  for name in mixtures:
    size = len(seqio.get_mixture_or_task(name).tasks)
    lines.append(f"  {name}  ({size} tasks)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(listing(_PATTERN.value))


if __name__ == "__main__":
  user_errors.run(main)
