"""The paragraphs the unlearning audits (`forget_audits`) are run on.

Members are paragraphs the original model was trained on: the distinct
segments of one language in the first training steps of its partition's
stream (`data.feature_rows.unpack_segments` moves each to a row of its
own, scored as it was packed). Non-members are the same language's
held-out paragraphs (the evaluation split), evenly spread over it, none
equal to a member. The split holds out contiguous runs of
lines inside each source block (`data.source_blocks`), so neighbouring
near-duplicates (interface strings, list items) never straddle it; what
distribution shift is left between the two sets is what the never-saw-it
reference's AUC measures.
"""

import dataclasses

import numpy as np

from tiered_routing.data import eval_data
from tiered_routing.data import feature_rows
from tiered_routing.data import stream_cache
from tiered_routing.eval import scoring
from tiered_routing.tier1 import languages


@dataclasses.dataclass(frozen=True)
class LanguageSets:
  """One language's membership-inference paragraphs, one per [L] row."""

  code: str
  partition: int
  members: feature_rows.Rows
  non_members: feature_rows.Rows
  member_texts: tuple[bytes, ...]
  non_member_texts: tuple[bytes, ...]

  @property
  def size(self) -> int:
    return len(self.member_texts)


def _texts(rows, code: str, c) -> tuple[bytes, ...]:
  vocabulary = eval_data.vocabulary_of(c.data.task_name(code))
  return tuple(t.encode("utf-8") for t in scoring.row_texts(rows, vocabulary))


def training_paragraphs(c, code: str) -> feature_rows.Rows:
  """Distinct paragraphs of `code` (at least `min_paragraph_tokens` long)
  in the first `scan_steps` batches of its partition's training stream:
  the original was trained on every one. {feature: [N, L]}."""
  audits = c.config.audits
  q = c.scheme.partition_of(code)
  _, rows, _ = c.spec.batch_shape
  steps = min(audits.scan_steps, c.spec.train_config.train_steps)
  stream = c.cache.stream(
      c.data.partition_names[q], c.cache.seed + q, rows, steps
  )
  return feature_rows.unpack_segments(
      stream, languages.language_id(code), audits.min_paragraph_tokens
  )


def language_sets(c, code: str) -> LanguageSets:
  """Members: `training_paragraphs`. Non-members: the language's held-out
  paragraphs (the evaluation split), evenly spread, without any that
  equal a member. As many of each, at most `paragraphs`."""
  audits = c.config.audits
  members = training_paragraphs(c, code)
  held = c.cache.validation_rows(
      {code: c.data.task_name(code)}, split=c.config.eval_split
  )[code]
  non = feature_rows.unpack_segments(
      held, languages.language_id(code), audits.min_paragraph_tokens
  )
  seen = {r.tobytes() for r in members["decoder_target_tokens"]}
  fresh = [
      i for i, r in enumerate(non["decoder_target_tokens"])
      if r.tobytes() not in seen
  ]
  n = min(audits.paragraphs, len(members["decoder_target_tokens"]), len(fresh))
  pick = np.asarray(fresh, np.int64)[
      stream_cache.spread(len(fresh), n) if n else np.arange(0)
  ]
  members = {k: v[:n] for k, v in members.items()}
  non = {k: v[pick] for k, v in non.items()}
  return LanguageSets(
      code, c.scheme.partition_of(code), members, non,
      _texts(members, code, c), _texts(non, code, c),
  )


def prompts(sets: LanguageSets, prefix: int, continuation: int, count: int):
  """(prompts, truths): prefixes of member paragraphs longer than the
  prefix, and their next tokens (at most `continuation`)."""
  targets = sets.members["decoder_target_tokens"]
  weights = sets.members["decoder_loss_weights"] > 0
  prompts, truths = [], []
  for tokens, keep in zip(targets, weights):
    tokens = tokens[keep]
    if len(tokens) > prefix and len(prompts) < count:
      prompts.append(tuple(int(t) for t in tokens[:prefix]))
      truths.append(tuple(int(t) for t in tokens[prefix:][:continuation]))
  return prompts, truths


def retained_language(c) -> str:
  """The retained language of the membership check: one of the forget
  partition's other languages, else one of its family, else any."""
  code = c.config.forget_language
  if c.plan.retain_languages:
    return c.plan.retain_languages[0]
  family = languages.get(code).family
  others = [x for x in languages.CODES if x != code]
  same = [x for x in others if languages.get(x).family == family]
  return (same or others)[0]


# Languages an attacker could relearn a forgotten one from without its own
# text: Urdu from Hindi (the same spoken language, Hindustani, in another
# script) and from Persian (the same Perso-Arabic script); Chinese from
# Japanese (shared Han characters); German from English (West Germanic).
RELATED = {
    "ur": ("hi", "fa"),
    "hi": ("ur",),
    "zh": ("ja",),
    "ja": ("zh",),
    "de": ("en",),
    "en": ("de",),
}


def related_languages(code: str) -> tuple[str, ...]:
  """`RELATED[code]`, else the first other language of its family."""
  if code in RELATED:
    return RELATED[code]
  family = languages.get(code).family
  return tuple(
      x for x in languages.CODES
      if x != code and languages.get(x).family == family
  )[:1]
