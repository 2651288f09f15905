"""SeqIO score metric functions: loss, perplexity and bits per byte of a task.

The per-language tasks register these (`score_metric_fns`, with
`scored_target_postprocessor`), so a `seqio.Evaluator` with a model
`score_fn` computes the numbers of `lm_metrics` for one task. SeqIO calls
them with the postprocessed targets and the per-example scores of a
`score_fn`; T5X's `score_batch` returns each example's summed token
log-likelihood, so the NLL is -score.

A target is plain text or a `ScoredTarget`. Plain text is SeqIO's default
(`targets_pretokenized`, else the decoded ids), but the LM tasks split long
documents into several examples that all carry the whole document as
`targets_pretokenized`, so that text would count a document's bytes once per
chunk; and re-encoding text need not give back the scored tokens (a chunk
may start mid-word). The tasks' `scored_target_postprocessor` hands the
metrics each example's own text and token count instead.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses

import numpy as np

from tiered_routing.eval import lm_metrics


@dataclasses.dataclass(frozen=True)
class ScoredTarget:
  """What one scored example holds: its decoded text and its token count.

  Attributes:
    text: the detokenized target ids of the example (not the document).
    num_tokens: scored tokens, EOS included.
  """

  text: str
  num_tokens: int


Target = str | bytes | ScoredTarget
MetricFn = Callable[[Sequence[Target], Sequence[float]], Mapping[str, float]]


def scored_target_postprocessor(vocabulary) -> Callable[..., object]:
  """A SeqIO `postprocess_fn` turning each target into a `ScoredTarget`.

  SeqIO calls `postprocess_fn(text, example=ex, is_target=True)` on targets
  before score metrics see them; the example's own `targets` ids give the
  text and token count. Predictions (is_target=False) pass unchanged.

  Args:
    vocabulary: the task's target vocabulary (`decode(list[int]) -> str`).
  """

  def postprocess(text, example=None, is_target=False):
    if not is_target or example is None:
      return text
    ids = [int(i) for i in np.asarray(example["targets"]).reshape(-1)]
    return ScoredTarget(vocabulary.decode(ids), len(ids))

  return postprocess


def _text(target: Target) -> str | bytes:
  return target.text if isinstance(target, ScoredTarget) else target


def _check_scores(targets, scores) -> tuple[list, np.ndarray]:
  targets = list(targets)
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or scores.shape[0] != len(targets):
    raise ValueError(
        f"scores must be one log-likelihood sum per target: expected shape "
        f"({len(targets)},), got {scores.shape}"
    )
  if not targets:
    raise ValueError("no targets to score")
  return targets, scores


def bits_per_byte_metric(
    targets: Sequence[str], scores: Sequence[float]
) -> dict[str, float]:
  """SeqIO score metric: bits per UTF-8 byte of the target texts."""
  targets, scores = _check_scores(targets, scores)
  num_bytes = sum(lm_metrics.num_utf8_bytes(_text(t)) for t in targets)
  return {
      "bits_per_byte": lm_metrics.bits_per_byte(-scores.sum(), num_bytes),
      "num_bytes": float(num_bytes),
  }


def log_likelihood_metric(
    targets: Sequence[str], scores: Sequence[float]
) -> dict[str, float]:
  """SeqIO score metric: mean per-example log-likelihood (nats)."""
  _, scores = _check_scores(targets, scores)
  return {"mean_log_likelihood": float(scores.mean())}


def make_token_loss_metric(
    count_tokens: Callable[[str], int], add_eos: bool = True
) -> MetricFn:
  """Builds a SeqIO score metric for token loss and perplexity.

  A `ScoredTarget` brings its token count; plain text is re-encoded.

  Args:
    count_tokens: number of tokens of one target text, e.g.
      `lambda t: len(vocabulary.encode(t))`.
    add_eos: the scored sequences carried an EOS token (SeqIO
      `Feature(add_eos=True)`) whose log-likelihood is in the score; added to
      the count of plain-text targets.

  Returns:
    `metric_fn(targets, scores) -> {"loss", "perplexity", "num_tokens"}`.
  """
  if not callable(count_tokens):
    raise ValueError(f"count_tokens must be callable, got {count_tokens!r}")

  def token_loss_metric(targets, scores):
    targets, scores = _check_scores(targets, scores)
    num_tokens = sum(
        t.num_tokens
        if isinstance(t, ScoredTarget)
        else int(count_tokens(t)) + int(add_eos)
        for t in targets
    )
    nll = -scores.sum()
    return {
        "loss": lm_metrics.token_loss(nll, num_tokens),
        "perplexity": lm_metrics.perplexity(nll, num_tokens),
        "num_tokens": float(num_tokens),
    }

  return token_loss_metric


def score_metric_fns(vocabulary=None, add_eos: bool = True) -> list[MetricFn]:
  """The score metrics to register on an LM task.

  Args:
    vocabulary: the task's target vocabulary (anything with `encode(str)`);
      None leaves out token loss and perplexity.
    add_eos: whether the task's targets feature appends EOS.
  """
  fns = [bits_per_byte_metric, log_likelihood_metric]
  if vocabulary is not None:
    fns.append(
        make_token_loss_metric(lambda t: len(vocabulary.encode(t)), add_eos)
    )
  return fns
