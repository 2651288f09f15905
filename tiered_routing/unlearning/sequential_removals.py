"""Sequential removal requests: several languages forgotten one after another.

MUSE (Shi et al. 2024, arXiv 2407.06460) asks whether unlearning is
sustainable: a deployed model receives removal requests in sequence, and an
approximate method must start each one from the model the previous request
left, so its damage to the other languages can compound. Exact unlearning
under strict partitions should cost one partition's retrain per request, or
nothing when the partition held only that language (SISA, Bourtoule et al.
2021), however many requests came before: the routing table
(`exact.RoutingTable`) carries the removals.

`run_sequence` removes `codes` in order from one trained configuration with
strict partitions (sharing 'none'; with shared parameters the exact model
after k removals would be a full retrain per k). After removal k:

  exact     the removed language's partition is retrained from its
            initialization on the languages it still serves (checkpoints
            under `<work_dir>/<k>_<code>/reference`), or dropped. It is the
            model that never saw any of the k languages: every other
            method is compared with it.
  mask      the critical experts of every removed language so far
            (attributed on the original's routing, `mask_method`) are
            masked together. When together they are every expert of a
            layer of a partition, masking cannot serve the request (the
            partition would have no expert left): from then on the mask
            rows are NaN with `mask_exhausted` = 1.
  gradient  each method (GA, GradDiff, NPO, NPO+retain, TRACE) steps from
            its own model after removal k - 1 and stops at the exact
            model's held-out loss on the new language (`held_out_stop`);
            methods identical by construction for the whole sequence (no
            request with retain data) run once (`method_runs`).

One row per (method, k) (`sequence_row`): the removed languages' mean loss
and gap closed against the exact model after k, the other languages' mean
loss change from the original and from the exact model, this removal's
cost and the cost of all k, and every language's loss (`loss_<code>`).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import numpy as np

from tiered_routing.model import param_count
from tiered_routing.tier1 import languages
from tiered_routing.unlearning import configuration
from tiered_routing.unlearning import exact
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import mask_method
from tiered_routing.unlearning import methods
from tiered_routing.unlearning import runner
from tiered_routing.unlearning import tradeoff_metrics

Trained = configuration.TrainedConfiguration
Cost = tradeoff_metrics.UnlearningCost

EXACT = "exact"


class _State(NamedTuple):
  """What one method has left after the removals so far."""

  params: Any
  results: tradeoff_metrics.LanguageResults
  cost: Cost
  critical_MxPxE: Optional[np.ndarray] = None  # The mask method's experts.


def check_sequence(c: Trained, codes: Sequence[str]) -> None:
  """Raises a ValueError naming what cannot be removed in sequence."""
  if not c.strict:
    raise ValueError(
        f"Sequential removals need strict partitions (sharing 'none'); "
        f"{c.run!r} has sharing {c.spec.model_config.sharing!r}."
    )
  for code in codes:
    languages.get(code)
  if not codes or len(set(codes)) != len(codes):
    raise ValueError(
        f"Sequential removal languages {list(codes)!r}; allowed: distinct "
        "language codes, at least one."
    )


def _stage(c: Trained, table, code: str, state: _State, method: str):
  """`c` set up to forget `code` from `state`'s model under `table`."""
  config = dataclasses.replace(
      c.config, forget_language=code, methods=(method,)
  )
  return dataclasses.replace(
      c, config=config, plan=exact.plan(table, code, c.data.task_name),
      original=state.params, base=state.results,
  )


def _add(a: Cost, b: Cost) -> Cost:
  return Cost(
      steps=a.steps + b.steps, train_tokens=a.train_tokens + b.train_tokens,
      forward_tokens=a.forward_tokens + b.forward_tokens,
      active_params=b.active_params,
  )


def _mask_step(
    c: Trained, state: _State, active: int
) -> Optional[methods.Row]:
  """The mask method with this language's critical experts added; None
  when that leaves a layer of a partition without any expert."""
  batches = methods.unlearning_batches(c)
  critical, tokens, extra = mask_method.attribution(c, batches)
  if state.critical_MxPxE is not None:
    critical = critical | state.critical_MxPxE
  if mask_method.leaves_no_expert(critical):
    return None
  return mask_method.mask_method(c, critical, active, tokens, extra)


def _exhausted_row(row: dict[str, Any]) -> dict[str, Any]:
  """The mask method's row once masking cannot serve the requests: the
  exact row's columns, every measurement NaN."""
  keep = ("run", "forget_language", "removals", "removed_last")
  return {**{k: (v if k in keep else math.nan) for k, v in row.items()},
          "method": "mask", "mask_exhausted": 1.0}


def _gradient_step(c: Trained, reference, active: int) -> methods.Row:
  (row,) = runner.approximate_rows(c, reference, active)
  return row


def method_runs(
    c: Trained, codes: Sequence[str]
) -> list[tuple[str, str]]:
  """(row name, method run) of every non-exact method. When no request
  has retain data (every removed language alone in its partition), GA =
  GradDiff and NPO = NPO+retain = TRACE by construction at every step:
  each group runs once and is one row named 'ga=graddiff' etc., as in the
  per-language units (`gradient_methods.identical_by_construction`)."""
  others = [m for m in c.config.methods if m != EXACT]
  table, has_retain = exact.RoutingTable.from_scheme(c.scheme), False
  for code in codes:
    has_retain |= bool(exact.plan(table, code, c.data.task_name)
                       .retain_languages)
    table = exact.drop_partition(table, code)
  gradient = tuple(m for m in others if m in gradient_methods.METHODS)
  groups = {g[0]: g for g in gradient_methods.identical_by_construction(
      gradient, has_retain)}
  return [("=".join(groups[m]), m) if m in groups else (m, m)
          for m in others if m in groups or m not in gradient]


def sequence_row(
    original: tradeoff_metrics.LanguageResults,
    exact_results: tradeoff_metrics.LanguageResults,
    results: tradeoff_metrics.LanguageResults,
    removed: Sequence[str],
    step: Cost,
    total: Cost,
    uniform_loss: float,
) -> dict[str, Any]:
  """One method's columns after removing `removed` (in order).

  Args:
    original: the model's results before any removal.
    exact_results: the exact model's after these removals.
    results: the method's.
    removed: the languages removed so far.
    step: the cost of the last removal.
    total: the cost of all of them.
    uniform_loss: log V (the target never goes past it).
  """
  kept = [x for x in languages.CODES if x not in removed]
  gaps = [
      tradeoff_metrics.forget_quality(
          x, results, original, exact_results, uniform_loss
      )["forget_gap_closed"]
      for x in removed
  ]
  mean = lambda values: float(np.mean(values)) if values else math.nan
  return {
      "removals": len(removed),
      "removed_last": removed[-1],
      "forget_loss": mean([results[x]["loss"] for x in removed]),
      "forget_loss_exact": mean([exact_results[x]["loss"] for x in removed]),
      "forget_gap_closed": mean(gaps),
      "retain_loss_delta": mean(
          [results[x]["loss"] - original[x]["loss"] for x in kept]
      ),
      "retain_loss_delta_vs_exact": mean(
          [results[x]["loss"] - exact_results[x]["loss"] for x in kept]
      ),
      "steps": step.steps,
      "train_tokens": step.train_tokens,
      "flops": step.flops,
      "cumulative_steps": total.steps,
      "cumulative_train_tokens": total.train_tokens,
      "cumulative_flops": total.flops,
      **{f"loss_{x}": float(results[x]["loss"]) for x in languages.CODES},
  }


def _exact_step(c: Trained, table, code: str, state: _State, k: int,
                work_dir: str, active: int):
  """(Reference, the exact state after removing `code`)."""
  stage = _stage(c, table, code, state, EXACT)
  ref = methods.reference_and_exact(
      stage, f"{work_dir}/{k}_{code}", active
  )
  params = state.params if ref.params is None else ref.params
  new = _State(params, ref.languages, _add(state.cost, ref.exact_row.cost))
  return ref, new, ref.exact_row.cost


def run_sequence(
    c: Trained, codes: Sequence[str], work_dir: str
) -> list[dict[str, Any]]:
  """Removes `codes` in order with every method; one row per (method, k).

  Args:
    c: a trained strict configuration (`configuration.prepare`); its
      `config.methods` are the methods run.
    codes: the removal requests, in order.
    work_dir: where the exact retrains' checkpoints go (a rerun restores).
  """
  check_sequence(c, codes)
  active = param_count.count_params(c.spec.model_config).active
  uniform = math.log(c.spec.model_config.vocab_size)
  start = _State(c.original, c.base, Cost(active_params=active))
  others = method_runs(c, codes)
  states = {name: start for name in [EXACT] + [n for n, _ in others]}
  table, rows = exact.RoutingTable.from_scheme(c.scheme), []
  exhausted = set()  # Methods that cannot serve the requests any more.
  for k, code in enumerate(codes, 1):
    ref, states[EXACT], step = _exact_step(
        c, table, code, states[EXACT], k, work_dir, active
    )
    steps = {EXACT: step}
    for name, m in others:
      if name in exhausted:
        continue
      stage = _stage(c, table, code, states[name], m)
      if m == "mask":
        stage = dataclasses.replace(stage, original=c.original)
        row = _mask_step(stage, states[name], active)
        if row is None:
          exhausted.add(name)
          continue
        critical = ~row.model.expert_mask_MxPxE
      else:
        row, critical = _gradient_step(stage, ref, active), None
      steps[name] = row.cost
      states[name] = _State(row.model.params, row.languages,
                            _add(states[name].cost, row.cost), critical)
    table = exact.drop_partition(table, code)
    removed = tuple(codes[:k])
    for m, state in states.items():
      row = {
          "run": c.run, "forget_language": "+".join(removed), "method": m,
          **sequence_row(c.base, states[EXACT].results, state.results,
                         removed, steps.get(m, step), state.cost, uniform),
      }
      if m == "mask":
        row = _exhausted_row(row) if m in exhausted else {
            **row, "mask_exhausted": 0.0}
      rows.append(row)
  return rows

