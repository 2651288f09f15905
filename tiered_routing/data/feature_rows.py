"""Host-side feature rows: padding, stacking and regrouping numpy batches.

A `Rows` is {feature: int32 array} whose trailing axes are [..., B, L] (B
rows of L tokens), e.g. one partition's [B, L] evaluation batch, the
[P, B, L] model batch, or [I, P, B, L] for I steps. All-zero rows are
padding: their loss weight is 0, so they change no loss, metric or count.
"""

from collections.abc import Mapping, Sequence

import numpy as np

Rows = dict[str, np.ndarray]
_WEIGHTS = "decoder_loss_weights"
_TARGETS = "decoder_target_tokens"


def zeros_like(rows: Mapping[str, np.ndarray]) -> Rows:
  return {k: np.zeros_like(v) for k, v in rows.items()}


def stack(parts: Sequence[Mapping[str, np.ndarray]], axis: int) -> Rows:
  return {k: np.stack([p[k] for p in parts], axis=axis) for k in parts[0]}


def place_block(
    rows: Mapping[str, np.ndarray], block: int, num_blocks: int, axis: int = 0
) -> Rows:
  """`rows` as block `block` of `num_blocks` stacked on `axis`, the other
  blocks all-zero rows (e.g. one partition's rows in a [P, B, L] batch)."""
  parts = [zeros_like(rows)] * num_blocks
  parts[block] = rows
  return stack(parts, axis=axis)


def scored_tokens(rows: Mapping[str, np.ndarray]) -> int:
  """Tokens with a non-zero loss weight (what a step actually trains on)."""
  return int(np.sum(rows[_WEIGHTS] > 0))


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> Rows:
  """Pads [b, L] features to [rows, L] with all-zero rows (weight 0)."""
  b = len(next(iter(batch.values())))
  if b > rows:
    raise ValueError(f"batch has {b} rows; allowed: at most rows={rows}")
  return {
      k: np.pad(v, [(0, rows - b)] + [(0, 0)] * (v.ndim - 1))
      for k, v in batch.items()
  }


def chunk_rows(rows: Mapping[str, np.ndarray], rows_per_batch: int) -> list:
  """Cuts [n, L] rows into [B, L] batches, the last padded with zero rows."""
  n = len(next(iter(rows.values())))
  out = []
  for start in range(0, n, rows_per_batch):
    batch = {k: v[start : start + rows_per_batch] for k, v in rows.items()}
    out.append(pad_rows(batch, rows_per_batch))
  return out


def rechunk(
    rows: Mapping[str, np.ndarray], rows_per_batch: int, num_batches: int
) -> Rows:
  """Regroups [..., B0, L] batches into `num_batches` of `rows_per_batch`.

  The rows keep their order and are reused cyclically when there are fewer
  than needed.

  Args:
    rows: {feature: [I0, B0, L]} (e.g. one partition's training batches).
    rows_per_batch: B of the result.
    num_batches: I of the result.

  Returns:
    {feature: [I, B, L]}.
  """
  out = {}
  for key, value in rows.items():
    flat = value.reshape(-1, value.shape[-1])
    index = np.arange(num_batches * rows_per_batch) % len(flat)
    out[key] = flat[index].reshape(num_batches, rows_per_batch, -1)
  return out


def regroup(batches: Mapping[str, np.ndarray], rows_per_batch: int) -> Rows:
  """[I, P, B, L] batches -> [I', P, B', L], rows in order, zero-padded.

  Partition q of new batch i holds partition q's rows i * B' ... (i+1) * B'
  - 1 of the old batches; missing rows at the end are zeros (weight 0).
  """
  n, p, r = next(iter(batches.values())).shape[:3]
  num = -(-n * r // rows_per_batch)
  out = {}
  for key, value in batches.items():
    flat = np.moveaxis(value, 1, 0).reshape(p, n * r, -1)
    flat = np.pad(flat, [(0, 0), (0, num * rows_per_batch - n * r), (0, 0)])
    out[key] = np.moveaxis(flat.reshape(p, num, rows_per_batch, -1), 0, 1)
  return out


def steps_of(batches: Mapping[str, np.ndarray], steps: int) -> Rows:
  """The first `steps` entries of [I, ...] batches (I steps)."""
  return {k: v[:steps] for k, v in batches.items()}


def unpack_segments(
    rows: Mapping[str, np.ndarray], language_id: int, min_tokens: int = 1
) -> Rows:
  """Every packed segment of one language as a row of its own.

  Membership audits score training paragraphs one by one; packed training
  rows hold several. A segment moved to the start of an empty row, with
  positions from 0 and segment id 1, is scored exactly as it was packed
  (attention and routing respect segments). Identical segments (a small
  corpus repeats) are kept once, in first-seen order.

  Args:
    rows: {feature: [..., L]} packed rows with 'decoder_segment_ids' and
      'decoder_language_ids'.
    language_id: keep this language's segments.
    min_tokens: keep segments with at least this many scored tokens.

  Returns:
    {feature: [N, L]}, the same features.
  """
  flat = {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
  segments = flat["decoder_segment_ids"]
  languages_ = flat["decoder_language_ids"]
  out, seen = [], set()
  for r in range(len(segments)):
    for s in np.unique(segments[r][segments[r] > 0]):
      where = np.flatnonzero(segments[r] == s)
      if languages_[r, where[0]] != language_id:
        continue
      key = flat[_TARGETS][r, where].tobytes()
      if flat[_WEIGHTS][r, where].sum() < min_tokens or key in seen:
        continue
      seen.add(key)
      row = {k: np.zeros_like(v[r]) for k, v in flat.items()}
      n = len(where)
      for k, v in flat.items():
        row[k][:n] = v[r, where]
      row["decoder_segment_ids"][:n] = 1
      if "decoder_positions" in row:
        row["decoder_positions"][:n] = np.arange(n)
      out.append(row)
  if not out:
    return {k: np.zeros((0, v.shape[-1]), v.dtype) for k, v in flat.items()}
  return stack(out, axis=0)
