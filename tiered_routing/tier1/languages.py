"""The 16 mC4 languages of the study, written out by hand.

The list is fixed here, never derived from TFDS, so that language ids (the
index in `LANGUAGES`) are stable across data sources, checkpoints and papers.
The order groups the languages into four families of four; the `family`
partition scheme cuts this order into contiguous blocks.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Language:
  """One language of the study.

  Attributes:
    code: mC4 / ISO 639-1 code, e.g. "hi".
    name: English name.
    family: the study's grouping (not strictly genealogical: Urdu sits with the
        Arabic-script languages of West and Central Asia, Vietnamese with East
        Asia, because script and region dominate what a tokenizer and a router
        see).
    script: main writing system of the mC4 text.
  """

  code: str
  name: str
  family: str
  script: str


LANGUAGES: tuple[Language, ...] = (
    Language("hi", "Hindi", "indic", "Devanagari"),
    Language("si", "Sinhala", "indic", "Sinhala"),
    Language("gu", "Gujarati", "indic", "Gujarati"),
    Language("pa", "Punjabi", "indic", "Gurmukhi"),
    Language("zh", "Chinese", "east_asian", "Han"),
    Language("vi", "Vietnamese", "east_asian", "Latin"),
    Language("ja", "Japanese", "east_asian", "Japanese"),
    Language("ko", "Korean", "east_asian", "Hangul"),
    Language("ar", "Arabic", "west_asian", "Arabic"),
    Language("fa", "Persian", "west_asian", "Arabic"),
    Language("ur", "Urdu", "west_asian", "Arabic"),
    Language("kk", "Kazakh", "west_asian", "Cyrillic"),
    Language("it", "Italian", "european", "Latin"),
    Language("en", "English", "european", "Latin"),
    Language("de", "German", "european", "Latin"),
    Language("es", "Spanish", "european", "Latin"),
)

CODES: tuple[str, ...] = tuple(lang.code for lang in LANGUAGES)
FAMILIES: tuple[str, ...] = tuple(
    dict.fromkeys(lang.family for lang in LANGUAGES)
)
NUM_LANGUAGES = len(LANGUAGES)

_BY_CODE = {lang.code: lang for lang in LANGUAGES}


def get(code: str) -> Language:
  """Returns the `Language` for `code`, or raises a ValueError naming it."""
  try:
    return _BY_CODE[code]
  except KeyError:
    raise ValueError(
        f"Unknown language {code!r}; allowed: {', '.join(CODES)}"
    ) from None


def language_id(code: str) -> int:
  """Stable integer id of a language: its index in `LANGUAGES`."""
  get(code)
  return CODES.index(code)


def family_members(family: str) -> tuple[str, ...]:
  """Codes of the languages in `family`, in canonical order."""
  if family not in FAMILIES:
    raise ValueError(
        f"Unknown family {family!r}; allowed: {', '.join(FAMILIES)}"
    )
  return tuple(lang.code for lang in LANGUAGES if lang.family == family)
