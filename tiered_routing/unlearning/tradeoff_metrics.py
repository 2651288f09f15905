"""Forget quality, retained utility and cost of an unlearning run.

All functions take per-language evaluation results as plain dicts,
`{language code: {'loss': mean token loss, 'bpb': bits per byte}}`, so they
work on whatever the evaluation binary wrote. Every function returns the
same keys whatever the inputs, with NaN where a value is undefined (no
reference model, no other language of the family evaluated), so rows of one
table always share their columns.
"""

import csv
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, TextIO

from tiered_routing.tier1 import languages

LanguageResults = Mapping[str, Mapping[str, float]]
RESULT_KEYS = ("loss", "bpb")
NAN = float("nan")


def _check_results(name: str, results: LanguageResults) -> None:
  if not results:
    raise ValueError(f"{name} is empty; expected {{code: {{'loss', 'bpb'}}}}.")
  for code, values in results.items():
    languages.get(code)
    for key in RESULT_KEYS:
      if key not in values:
        raise ValueError(
            f"{name}[{code!r}] has no {key!r}; it needs "
            f"{RESULT_KEYS}, got {sorted(values)}."
        )
      if not math.isfinite(float(values[key])):
        raise ValueError(
            f"{name}[{code!r}][{key!r}] = {values[key]!r} is not " "finite."
        )


def _get(name: str, results: LanguageResults, code: str) -> Mapping[str, float]:
  if code not in results:
    raise ValueError(
        f"{name} has no result for language {code!r}; it has "
        f"{sorted(results)}."
    )
  return results[code]


def forget_quality(
    forget_language: str,
    unlearned: LanguageResults,
    original: LanguageResults,
    reference: Optional[LanguageResults] = None,
    uniform_loss: float = math.inf,
) -> dict[str, float]:
  """How far the forget language's loss rose, absolutely and toward a reference.

  Args:
    forget_language: code of the forgotten language.
    unlearned: results of the unlearned model.
    original: results of the model before unlearning.
    reference: results of a model trained without the forget language (the
      exact-retrain model), if one exists.
    uniform_loss: the loss of the uniform distribution, log V. A reference
      can score the language *worse* than uniform (a model that never saw
      a script spreads its mass badly); forgetting never needs to go past
      knowing nothing, so the target is min(L_ref, log V).

  Returns:
    forget_loss, forget_loss_original, forget_loss_delta (= unlearned -
    original), forget_bpb, forget_bpb_delta, forget_loss_reference,
    forget_loss_target = min(L_ref, uniform_loss),
    reference_worse_than_uniform (1.0 / 0.0) and forget_gap_closed =
    (L_unlearned - L_orig) / (L_target - L_orig): 0 = no change, 1 = as
    if never seen, > 1 = overshoot. The reference columns and the gap are
    NaN without a reference, and the gap is NaN when L_target == L_orig.
  """
  languages.get(forget_language)
  for name, res in (("unlearned", unlearned), ("original", original)):
    _check_results(name, res)
  u = _get("unlearned", unlearned, forget_language)
  o = _get("original", original, forget_language)
  out = {
      "forget_loss": float(u["loss"]),
      "forget_loss_original": float(o["loss"]),
      "forget_loss_delta": float(u["loss"]) - float(o["loss"]),
      "forget_bpb": float(u["bpb"]),
      "forget_bpb_delta": float(u["bpb"]) - float(o["bpb"]),
      "forget_loss_reference": NAN,
      "forget_loss_target": NAN,
      "reference_worse_than_uniform": NAN,
      "forget_gap_closed": NAN,
  }
  if reference is not None:
    _check_results("reference", reference)
    ref_loss = float(_get("reference", reference, forget_language)["loss"])
    target = min(ref_loss, uniform_loss)
    out["forget_loss_reference"] = ref_loss
    out["forget_loss_target"] = target
    out["reference_worse_than_uniform"] = float(ref_loss > uniform_loss)
    gap = target - float(o["loss"])
    if abs(gap) > 1e-12:
      out["forget_gap_closed"] = out["forget_loss_delta"] / gap
  return out


def _mean(results: LanguageResults, codes, key: str) -> float:
  if not codes:
    return NAN
  return sum(float(results[c][key]) for c in codes) / len(codes)


def utility(
    forget_language: str,
    unlearned: LanguageResults,
    original: Optional[LanguageResults] = None,
    partition: Sequence[str] = (),
) -> dict[str, float]:
  """Mean loss and bpb of the retained languages, overall and by group.

  Groups: 'retain' = every evaluated language but the forgotten one,
  'family' = the retained languages of the forgotten language's family (most
  at risk of collateral forgetting), 'other' = the rest; with `partition`
  (the languages of the forget language's tier-1 partition) also
  'inside' = its retained languages and 'outside' = the retained languages
  of every other partition. With `original`, '<group>_<metric>_delta' =
  unlearned - original over the same languages.

  Returns:
    {retain,family,other,inside,outside}_{loss,bpb} and their _delta (NaN
    without original or for an empty group).
  """
  family = languages.get(forget_language).family
  _check_results("unlearned", unlearned)
  retain = [
      c for c in languages.CODES if c in unlearned and c != forget_language
  ]
  if not retain:
    raise ValueError(
        f"unlearned has no language but {forget_language!r}; "
        "utility needs retained languages."
    )
  groups = {
      "retain": retain,
      "family": [c for c in retain if languages.get(c).family == family],
      "other": [c for c in retain if languages.get(c).family != family],
      "inside": [c for c in retain if c in partition],
      "outside": [c for c in retain if partition and c not in partition],
  }
  if original is not None:
    _check_results("original", original)
    for c in retain:
      _get("original", original, c)
  out = {}
  for group, codes in groups.items():
    for key in RESULT_KEYS:
      value = _mean(unlearned, codes, key)
      out[f"{group}_{key}"] = value
      out[f"{group}_{key}_delta"] = (
          NAN if original is None else value - _mean(original, codes, key)
      )
  return out


def training_flops(active_params: int, tokens: int) -> float:
  """6 N T: forward + backward FLOPs of T tokens (Kaplan et al. 2020)."""
  return 6.0 * active_params * tokens


def forward_flops(active_params: int, tokens: int) -> float:
  """2 N T: forward-only FLOPs (statistics, reference log-likelihoods)."""
  return 2.0 * active_params * tokens


@dataclasses.dataclass(frozen=True)
class UnlearningCost:
  """Compute spent by an unlearning method.

  Attributes:
    steps: optimizer steps.
    train_tokens: tokens in those steps (forget + retain).
    forward_tokens: tokens in forward-only passes (routing statistics for
      attribution, NPO reference log-likelihoods).
    active_params: parameters active per token (MoE: only the routed
      experts), as reported by the parameter-count tool.
  """

  steps: int = 0
  train_tokens: int = 0
  forward_tokens: int = 0
  active_params: int = 0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"UnlearningCost.{f.name}={value!r} must be an int " ">= 0."
        )

  @property
  def flops(self) -> float:
    return training_flops(
        self.active_params, self.train_tokens
    ) + forward_flops(self.active_params, self.forward_tokens)

  def as_dict(self) -> dict[str, float]:
    return {
        "steps": self.steps,
        "train_tokens": self.train_tokens,
        "forward_tokens": self.forward_tokens,
        "active_params": self.active_params,
        "flops": self.flops,
    }


@dataclasses.dataclass(frozen=True)
class UnlearningResult:
  """One row of the trade-off table.

  Attributes:
    run: the trained configuration, e.g. 'family4_attention'.
    method: unlearning method, e.g. 'npo' or 'exact_retrain'.
    forget_language: the forgotten language's code.
    forget: `forget_quality(...)` output.
    utility: `utility(...)` output.
    cost: compute spent.
    extra: further columns (scheme, sharing, hyper-parameters,
      compartmentalization metrics); must not reuse another column's name.
  """

  run: str
  method: str
  forget_language: str
  forget: Mapping[str, float]
  utility: Mapping[str, float]
  cost: UnlearningCost = UnlearningCost()
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    languages.get(self.forget_language)
    for name in ("run", "method"):
      if not getattr(self, name):
        raise ValueError(
            f"UnlearningResult.{name} must be a non-empty " "string."
        )

  def to_row(self) -> dict[str, Any]:
    """A flat {column: value} dict: identity, forget, utility, cost, extra."""
    row = {
        "run": self.run,
        "method": self.method,
        "forget_language": self.forget_language,
    }
    for part in (self.forget, self.utility, self.cost.as_dict(), self.extra):
      for key, value in part.items():
        if key in row:
          raise ValueError(f"UnlearningResult column {key!r} appears twice.")
        row[key] = value
    return row


def write_csv(results: Iterable[UnlearningResult], stream: TextIO) -> None:
  """Writes results as CSV; columns in first-seen order, blanks if missing."""
  rows = [r.to_row() for r in results]
  columns = list(dict.fromkeys(k for row in rows for k in row))
  writer = csv.DictWriter(
      stream, fieldnames=columns, restval="", lineterminator="\n"
  )
  writer.writeheader()
  writer.writerows(rows)
