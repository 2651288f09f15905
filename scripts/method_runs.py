"""Checkpoints, per-language evaluation and result tables for method scripts.

Shared by scripts/moefy.py, scripts/expert_gates.py and scripts/finetune.py
(the related-methods experiments): restore the parameters a trainer run
saved, evaluate any parameters on whole SeqIO validation splits per language
(the batches of the eval binary, `tiered_routing.eval.eval_batches`), and
write Markdown tables.
"""

import contextlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from tiered_routing import checkpoints
from tiered_routing import eval as eval_lib
from tiered_routing import languages
from tiered_routing import partitions
from tiered_routing import train_state
from tiered_routing import trainer
from tiered_routing.evaluation import metrics
from tiered_routing.model import transformer


def restore_params(
    model_dir: str,
    model_config: transformer.DecoderConfig,
    mesh,
    batch_shape,
    step: Optional[int] = None,
):
  """(step, params) of a trainer checkpoint in MODEL_DIR/checkpoints."""
  model = transformer.TieredDecoder(model_config)
  _, abstract, shardings = train_state.param_layout(model, mesh, batch_shape)
  with checkpoints.Checkpointer(
      os.path.join(model_dir, "checkpoints"), async_save=False
  ) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {model_dir}/checkpoints.")
    params = ckpt.restore_params(
        step, abstract_params=checkpoints.abstract_like(abstract, shardings)
    )
  return step, params


class Evaluator:
  """Per-language validation loss of any parameters of one model layout.

  The validation batches are built once and reused for every evaluation.
  """

  def __init__(
      self,
      names: Sequence[str],
      scheme: partitions.PartitionScheme,
      length: int,
      rows: int,
      split: str = "validation",
  ):
    self.batches = list(
        eval_lib.eval_batches(names, scheme, length, rows, split)
    )
    vocabulary = (
        seqio.get_mixture_or_task(names[0])
        .output_features["targets"]
        .vocabulary
    )
    self.num_bytes = [
        eval_lib.bytes_per_language(b, vocabulary) for b in self.batches
    ]

  def evaluate(
      self,
      model: Any,
      params: Any,
      context: Callable[[], Any] = contextlib.nullcontext,
  ) -> dict[str, float]:
    """Flat '{code}/loss', 'all/loss', 'macro/loss', bits per byte, ...

    Args:
      model: a `TieredDecoder` or a stand-in with its `apply`.
      params: its parameters.
      context: returns a context manager active while the step is traced
        (e.g. `moefication.moefied`).
    """

    def step(params, batch):
      with context():
        return trainer.eval_step(params, batch, model=model)

    step = jax.jit(step)
    acc = metrics.LanguageLossAccumulator()
    for batch, num_bytes in zip(self.batches, self.num_bytes):
      sums = jax.device_get(
          step(
              params,
              {k: batch[k] for k in trainer.MODEL_FEATURES if k in batch},
          )
      )
      for i in np.flatnonzero(sums["weight_sum_N"]):
        acc.add(
            languages.CODES[i],
            sums["loss_sum_N"][i],
            sums["weight_sum_N"][i],
            num_bytes[i],
        )
    return acc.results()


def mean_loss(results: Mapping[str, float], codes: Sequence[str]) -> float:
  """Unweighted mean validation loss over the languages `codes`."""
  return float(np.mean([results[f"{c}/loss"] for c in codes]))


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> str:
  """A Markdown table; floats with 4 decimals."""
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  lines = [
      "| " + " | ".join(columns) + " |",
      "|" + "|".join("---" for _ in columns) + "|",
  ]
  lines += [
      "| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows
  ]
  return "\n".join(lines)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path`, creating directories."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
