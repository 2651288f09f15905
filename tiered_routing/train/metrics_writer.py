"""Metrics to TensorBoard event files, a JSON-lines file and the console.

Each `write` sends the scalars to TensorBoard (`tf.summary`) and appends one
JSON object per step (`{"step": ..., name: value, ...}`) to `metrics.jsonl`
in the same directory, so results can be read without TensorBoard. A run that
is resumed after a kill appends again from its last checkpoint, so a step may
appear more than once: readers keep the last record of each step
(`read_jsonl`). Only process 0 of a multi-host job writes.

`TrainMetricsLog` sits between the training loop and the writer: it buffers
the device metrics of each step, fetches them only at log and checkpoint
steps, stops training at the first non-finite step, and writes interval
averages (exact per-language train loss, router statistics, tokens/s) with a
console progress line.
"""

import datetime
import json
import math
import os
import time
from typing import Any, Mapping, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tiered_routing.tier1 import languages

JSONL_NAME = "metrics.jsonl"


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
  """A `Summary` of `simple_value`s: TensorBoard's scalar dashboard and its
  `EventAccumulator` (`Tags()['scalars']`) read these directly; the tensor
  summaries TF2's `tf.summary` writes show up only under 'tensors' there."""
  return summary_pb2.Summary(value=[
      summary_pb2.Summary.Value(tag=name, simple_value=value)
      for name, value in scalars.items()
  ]).SerializeToString()


def _to_python(value: Any) -> Any:
  """JSON-friendly copy of numpy / jax scalars and arrays."""
  if isinstance(value, Mapping):
    return {str(k): _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


class MetricsWriter:
  """Writes metrics of one job kind (e.g. 'train', 'eval') under `log_dir`.

  Usage:
    writer = MetricsWriter(os.path.join(model_dir, "train"))
    writer.write(step, {"loss": 2.3}, extra={"expert_usage": [...]})
    writer.close()
  """

  def __init__(self, log_dir: str, is_primary: Optional[bool] = None):
    """Opens (creating) `log_dir`.

    Args:
      log_dir: directory of the event files and `metrics.jsonl` (local or a
        tf.io.gfile URL such as gs://).
      is_primary: whether this process writes; None means process 0.
    """
    if is_primary is None:
      is_primary = jax.process_index() == 0
    self.log_dir = log_dir
    self.jsonl_path = os.path.join(log_dir, JSONL_NAME)
    self._enabled = is_primary
    self._remote = "://" in log_dir
    self._lines: list[str] = []
    self._summary = None
    if not self._enabled:
      return
    tf.io.gfile.makedirs(log_dir)
    self._summary = tf.summary.create_file_writer(log_dir)
    if self._remote and tf.io.gfile.exists(self.jsonl_path):
      # Object stores cannot append: keep the lines and rewrite the file.
      with tf.io.gfile.GFile(self.jsonl_path) as f:
        self._lines = f.read().splitlines()
    elif not self._remote:
      _end_torn_line(self.jsonl_path)

  def write(
      self,
      step: int,
      scalars: Mapping[str, Any],
      extra: Optional[Mapping[str, Any]] = None,
  ) -> None:
    """Writes scalars (TensorBoard + JSON) and `extra` (JSON only) at `step`.

    Non-finite scalars are written as they are (NaN / Infinity in JSON).
    """
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    with self._summary.as_default():
      tf.summary.experimental.write_raw_pb(
          tf.constant(_scalar_summary(scalars)), step=step)
    self._summary.flush()
    record = {"step": int(step), **scalars, **_to_python(dict(extra or {}))}
    self._append(json.dumps(record, sort_keys=True))

  def _append(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
      with tf.io.gfile.GFile(self.jsonl_path, "w") as f:
        f.write("\n".join(self._lines) + "\n")
    else:
      with open(self.jsonl_path, "a", encoding="utf-8") as f:
        f.write(line + "\n")

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
      self._summary = None


def _end_torn_line(path: str) -> None:
  """Ends a last line cut short by a kill, so the next record is appended
  on a line of its own (`read_jsonl` skips the torn one) instead of onto
  it, where both would be lost."""
  try:
    with open(path, "rb+") as f:
      if f.seek(0, os.SEEK_END) == 0:
        return
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")
  except FileNotFoundError:
    pass


def read_jsonl(path: str) -> dict[int, dict[str, Any]]:
  """{step: record} from a metrics file; later records of a step win.

  A line cut short by a kill is skipped.
  """
  records = {}
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      records[int(record["step"])] = record
  return records


def summarize(step_metrics: list[Mapping[str, Any]]) -> tuple[dict, dict]:
  """Averages the host metrics of several train steps (`steps.train_step`).

  Returns:
    (scalars, extra): scalars for TensorBoard and JSON, including the exact
    per-language train cross-entropy 'cross_entropy/<code>' of the languages
    seen; extra holds per-expert usage vectors (JSON only).
  """
  total = lambda k: float(sum(np.sum(m[k]) for m in step_metrics))
  mean = lambda k: float(np.mean([m[k] for m in step_metrics]))
  scalars = {
      "loss": mean("loss"),
      "tokens": total("weight_sum"),
      "cross_entropy": (
          total("cross_entropy_sum") / max(total("weight_sum"), 1.0)
      ),
  }
  for key in ("load_balance_loss", "router_z_loss", "grad_norm", "param_norm"):
    scalars[key] = mean(key)
  lang_loss = sum(m["loss_sum_N"] for m in step_metrics)
  lang_weight = sum(m["weight_sum_N"] for m in step_metrics)
  for code, loss, weight in zip(languages.CODES, lang_loss, lang_weight):
    if weight > 0:
      scalars[f"cross_entropy/{code}"] = float(loss / weight)
  extra = {}
  router_keys = (
      set(step_metrics[0])
      - set(scalars)
      - {
          "cross_entropy_sum",
          "weight_sum",
          "loss_sum_N",
          "weight_sum_N",
          "finite",
      }
  )
  for key in sorted(router_keys):
    value = np.mean([m[key] for m in step_metrics], axis=0)
    if np.ndim(value) == 0:
      scalars[f"router/{key}"] = float(value)
    else:  # Expert usage: 1.0 = perfectly balanced experts.
      extra[f"router/{key}"] = value.tolist()
      scalars[f"router/{key}_max_over_mean"] = float(
          np.max(value) / max(np.mean(value), 1e-12)
      )
  return scalars, extra


class Throughput:
  """Tokens per second and steps per second between successive `rates`."""

  def __init__(self):
    self._time = time.perf_counter()
    self._tokens = 0.0
    self._steps = 0

  def add(self, tokens: float, steps: int = 1) -> None:
    self._tokens += tokens
    self._steps += steps

  def rates(self) -> dict[str, float]:
    """{'tokens_per_second', 'steps_per_second'} since the last call."""
    now = time.perf_counter()
    elapsed = max(now - self._time, 1e-9)
    out = {
        "tokens_per_second": self._tokens / elapsed,
        "steps_per_second": self._steps / elapsed,
    }
    self._time, self._tokens, self._steps = now, 0.0, 0
    return out


def progress_line(
    step: int, total_steps: int, scalars: Mapping[str, float]
) -> str:
  """One console line, e.g. 'step 120/300 | loss 5.12 | 9,876 tok/s | ...'."""
  parts = [f"step {step:>{len(str(total_steps))}}/{total_steps}"]
  if "loss" in scalars:
    parts.append(f"loss {scalars['loss']:.4f}")
  if "learning_rate" in scalars:
    parts.append(f"lr {scalars['learning_rate']:.2e}")
  tokens_per_second = scalars.get("tokens_per_second")
  if tokens_per_second is not None:
    parts.append(f"{tokens_per_second:,.0f} tok/s")
  steps_per_second = scalars.get("steps_per_second")
  if steps_per_second:
    parts.append(f"{steps_per_second:.2f} step/s")
    remaining = (total_steps - step) / steps_per_second
    if math.isfinite(remaining):
      parts.append(f"eta {datetime.timedelta(seconds=round(remaining))}")
  return " | ".join(parts)


def log_progress(
    step: int, total_steps: int, scalars: Mapping[str, float]
) -> None:
  """Logs `progress_line` (absl INFO) on process 0."""
  if jax.process_index() == 0:
    logging.info("%s", progress_line(step, total_steps, scalars))


class TrainMetricsLog:
  """Buffers the device metrics of train steps; checks; writes averages.

  Fetching metrics forces the host to wait for the device, so it happens
  only at log and checkpoint steps. `check` must run before every save: it
  raises at the first step whose loss, gradients or new parameters are not
  finite, so a diverged state is never checkpointed.
  """

  def __init__(
      self, writer: MetricsWriter, schedule, total_steps: int, ckpt_dir: str
  ):
    self._writer, self._schedule = writer, schedule
    self._total_steps = total_steps
    self._ckpt_dir = ckpt_dir
    self._pending: list[tuple[int, Any]] = []
    self._since_write: list[Mapping[str, Any]] = []
    self._throughput = Throughput()

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def check(self, last_good: Optional[int]) -> None:
    """Fetches pending metrics; raises at the first non-finite step.

    Args:
      last_good: the newest checkpoint step, named in the error.

    Raises:
      FloatingPointError: naming the first non-finite step.
    """
    steps = [s for s, _ in self._pending]
    host = jax.device_get([m for _, m in self._pending])
    self._pending.clear()
    for step, m in zip(steps, host):
      if not m["finite"]:
        raise FloatingPointError(
            f"Non-finite values at training step {step} (the update from "
            f"step {step - 1}): loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}, param_norm={float(m['param_norm'])}. "
            f"Training stopped; nothing after step {step - 1} was saved. Last"
            f" good checkpoint: step {last_good} in {self._ckpt_dir}."
        )
      self._throughput.add(float(m["weight_sum"]))
    self._since_write.extend(host)

  def write(self, step: int) -> None:
    scalars, extra = summarize(self._since_write)
    self._since_write = []
    scalars.update(self._throughput.rates())
    scalars["learning_rate"] = float(self._schedule(step - 1))
    self._writer.write(step, scalars, extra)
    log_progress(step, self._total_steps, scalars)
