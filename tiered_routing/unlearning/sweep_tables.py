"""The sweep's tables beyond the method rows: languages, originals, pairs.

  per_language_rows   every model's loss on every language, per seed, with
                      the language's unigram and bigram baselines.
  original_rows       per (configuration, seed): the original model's mean
                      loss and its margins over the baselines (how much
                      better than counting it is; the worst language).
  comparisons         paired differences over seeds (`sweep_statistics`)
                      of the questions the sweep asks: each method against
                      its proper baseline (TRACE vs NPO+retain, NPO+retain
                      vs NPO, GradDiff vs GA) within a configuration, and
                      each configuration against n = 1, its strict
                      counterpart at the same n (the hybrids) and the
                      family scheme (random schemes), for the same method;
                      and each method's audits (`forget_audits`: the
                      relearning attacks, membership AUC, recitation,
                      int4 round trip, routing replay) against the
                      never-saw-it model, `exact_retrain` or the dropped
                      partition `exact_drop` (kind 'audit vs reference').
                      q-values (`sweep_statistics`) treat the table as
                      one family (`q_value`) and each kind of question
                      as its own (`q_value_in_kind`).
"""

import re

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from tiered_routing.unlearning import sweep_statistics

NAN = float("nan")
METHOD_PAIRS = (
    ("trace", "npo_retain"),
    ("npo_retain", "npo"),
    ("graddiff", "ga"),
)
PAIR_METRICS = (
    "retain_loss_delta",
    "inside_loss_delta",
    "outside_loss_delta",
    "forget_gap_closed",
)
ONE_PARTITION = "family1_none"
IN_KIND = "_in_kind"  # Suffix of the q-value columns computed per kind.
# The never-saw-it model each method's audits are compared with: the
# retrained model, or (a partition that held only the forget language) the
# dropped partition, whose text then scores as uniform.
REFERENCES = ("exact_retrain", "exact_drop")
AUDIT_METRICS = (
    "mia_auc_minkpp",
    "verbmem_rougel",
    "quant_int4_forget_loss_change",
    "routing_replay_forget_loss_change",
)
_RELEARNED = re.compile(r"relearn_(\d+|related_[a-z]+)_(recovered|steps)$")


def per_language_rows(
    payloads: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, Mapping[str, float]],
) -> list[dict[str, Any]]:
  """One row per (run, seed, forget language, model, language); the
  original model (shared by every forget language) appears once, with an
  empty forget_language."""
  rows, seen = [], set()
  for p in payloads:
    first = p["rows"][0]
    run, seed, forget = first["run"], p["seed"], first["forget_language"]
    for model, results in p["languages"].items():
      if model == "original":
        if (run, seed) in seen:
          continue
        seen.add((run, seed))
      for code, r in results.items():
        base = baselines.get(code, {})
        rows.append({
            "run": run,
            "seed": seed,
            "forget_language": "" if model == "original" else forget,
            "model": model,
            "language": code,
            "loss": r["loss"],
            "bpb": r["bpb"],
            "unigram_loss": base.get("unigram_loss", NAN),
            "bigram_loss": base.get("bigram_loss", NAN),
        })
  return rows


def original_rows(per_language: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Per (run, seed): the original's mean loss over the languages and its
  margins over the baselines (baseline minus model: > 0 = better)."""
  groups: dict[tuple, list] = {}
  for r in per_language:
    if r["model"] == "original":
      groups.setdefault((r["run"], r["seed"]), []).append(r)
  out = []
  for (run, seed), rows in groups.items():
    uni = np.array([r["unigram_loss"] - r["loss"] for r in rows])
    bi = np.array([r["bigram_loss"] - r["loss"] for r in rows])
    worst = rows[int(np.argmin(uni))]["language"]
    out.append({
        "run": run,
        "forget_language": "",
        "method": "original",
        "seed": seed,
        "mean_loss": float(np.mean([r["loss"] for r in rows])),
        "mean_bpb": float(np.mean([r["bpb"] for r in rows])),
        "min_unigram_margin": float(uni.min()),
        "worst_language": worst,
        "mean_bigram_margin": float(bi.mean()),
        "min_bigram_margin": float(bi.min()),
    })
  return out


def _split_run(run: str) -> tuple[str, str]:
  """'family4_attention' -> ('family4', 'attention')."""
  scheme, _, sharing = run.rpartition("_")
  return scheme, sharing


def _partners(run: str, runs: set[str]) -> list[str]:
  """The configurations `run` is compared with (present in `runs`)."""
  scheme, sharing = _split_run(run)
  out = [ONE_PARTITION]
  if sharing != "none":
    out.append(f"{scheme}_none")
  if scheme.startswith("random"):
    n = scheme[len("random") :].split("s")[0]
    out.append(f"family{n}_{sharing}")
  return [p for p in dict.fromkeys(out) if p != run and p in runs]


def _pair(rows, a, b, metric, kind) -> Optional[dict[str, Any]]:
  try:
    diff = sweep_statistics.paired_difference(rows, a, b, metric)
  except (KeyError, ValueError):
    return None
  if not diff["seeds"] or math.isnan(diff["diff_mean"]):
    return None
  return {
      "kind": kind,
      "forget_language": a["forget_language"],
      "a": f"{a['run']}:{a['method']}",
      "b": f"{b['run']}:{b['method']}",
      "metric": metric,
      **diff,
  }


def _audit_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The audit columns the rows have: AUDIT_METRICS and every relearning
  attack's recovered fraction and steps to half the gap."""
  present = dict.fromkeys(k for r in rows for k in r)
  return [m for m in AUDIT_METRICS if m in present] + [
      k for k in present if _RELEARNED.match(k)
  ]


def _baseline_pairs(rows, keys, a, metrics, kind) -> list:
  """`a` (a method's key) against its proper baseline (METHOD_PAIRS) in
  the same configuration and forget language(s), when both have rows."""
  run, lang, method = a["run"], a["forget_language"], a["method"]
  return [
      _pair(rows, a, {**a, "method": second}, metric, kind)
      for first, second in METHOD_PAIRS
      if method == first and (run, lang, second) in keys
      for metric in metrics
  ]


def comparisons(
    rows: Sequence[Mapping[str, Any]], originals: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """Paired differences a - b (see the module doc); one row each."""
  keys = {(r["run"], r["forget_language"], r["method"]) for r in rows}
  runs = {r["run"] for r in rows} | {r["run"] for r in originals}
  out = []
  for run, lang, method in sorted(keys):
    a = {"run": run, "forget_language": lang, "method": method}
    out += _baseline_pairs(rows, keys, a, PAIR_METRICS,
                           "method vs its baseline")
    for partner in _partners(run, runs):
      if (partner, lang, method) in keys:
        for metric in PAIR_METRICS:
          out.append(_pair(rows, a, {**a, "run": partner}, metric,
                           "configuration"))
    for reference in REFERENCES:
      if method not in REFERENCES and (run, lang, reference) in keys:
        for metric in _audit_metrics(rows):
          out.append(_pair(rows, a, {**a, "method": reference}, metric,
                           "audit vs reference"))
  for run in sorted({r["run"] for r in originals}):
    a = {"run": run, "forget_language": "", "method": "original"}
    for partner in _partners(run, runs):
      for metric in ("mean_loss", "mean_bpb"):
        out.append(_pair(originals, a, {**a, "run": partner}, metric,
                         "original utility"))
  return with_q_values([r for r in out if r is not None])


def with_q_values(
    pairs: Sequence[Mapping[str, Any]], by_kind: bool = True
) -> list[dict[str, Any]]:
  """The differences with their q-values: the whole table one family
  (`q_value`, `resolved_fdr`) and, with by_kind, each `kind` of question
  its own (the same columns with the IN_KIND suffix)."""
  whole = sweep_statistics.with_false_discovery_rate(pairs)
  if not by_kind:
    return whole
  return sweep_statistics.with_false_discovery_rate(
      whole, family="kind", suffix=IN_KIND)


SEQUENTIAL_METRICS = ("retain_loss_delta_vs_exact", "forget_gap_closed")


def sequential_comparisons(
    rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """Paired differences over seeds of the sequential removals (kind
  'sequential: method vs its baseline'): after each request (the removed
  languages, e.g. 'ur+de'), each method against its proper baseline
  (METHOD_PAIRS), on the kept languages' loss against the exact model and
  the gap closed."""
  keys = {(r["run"], r["forget_language"], r["method"]) for r in rows}
  out = []
  # In request order (the removed languages' count), then by name: the
  # keys are a set, and the file must not depend on its iteration order.
  for run, removed, method in sorted(
      keys, key=lambda k: (k[0], k[1].count("+"), k)):
    a = {"run": run, "forget_language": removed, "method": method}
    out += _baseline_pairs(rows, keys, a, SEQUENTIAL_METRICS,
                           "sequential: method vs its baseline")
  return with_q_values([r for r in out if r is not None], by_kind=False)
