"""Languages and tier-1 partition schemes: coverage, disjointness, errors."""

import pytest

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes

ALL_SCHEMES = [
    *(schemes.family(n) for n in schemes.ALLOWED_NUM_PARTITIONS),
    *(
        schemes.random(n, seed=s)
        for n in schemes.ALLOWED_NUM_PARTITIONS
        for s in (0, 1, 7)
    ),
    schemes.per_language(),
]


def test_sixteen_languages_in_four_families_of_four():
  assert languages.CODES == (
      "hi",
      "si",
      "gu",
      "pa",
      "zh",
      "vi",
      "ja",
      "ko",
      "ar",
      "fa",
      "ur",
      "kk",
      "it",
      "en",
      "de",
      "es",
  )
  for family in languages.FAMILIES:
    assert len(languages.family_members(family)) == 4
  assert languages.get("kk").script == "Cyrillic"
  assert languages.language_id("es") == 15


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
def test_every_scheme_covers_the_languages_disjointly_and_evenly(scheme):
  members = [c for part in scheme.partitions for c in part]
  assert sorted(members) == sorted(languages.CODES)
  assert len(set(members)) == len(members)
  sizes = {len(part) for part in scheme.partitions}
  assert sizes == {16 // scheme.num_partitions}
  table = scheme.language_to_partition_table()
  for code in languages.CODES:
    p = scheme.partition_of(code)
    assert code in scheme.languages_of(p)
    assert table[languages.language_id(code)] == p


def test_family_scheme_is_the_families_at_four_and_nests():
  fam4 = schemes.family(4)
  for p, family in enumerate(languages.FAMILIES):
    assert fam4.languages_of(p) == languages.family_members(family)
  fam2, fam8 = schemes.family(2), schemes.family(8)
  assert fam2.languages_of(0) == fam4.languages_of(0) + fam4.languages_of(1)
  assert fam8.languages_of(6) + fam8.languages_of(7) == fam4.languages_of(3)


def test_random_scheme_is_seeded():
  assert schemes.random(4, 3) == schemes.random(4, 3)
  assert schemes.random(4, 3) != schemes.random(4, 4)
  assert schemes.random(4, 3).name == "random4s3"


def test_custom_from_mapping_and_lists_agree():
  lists = [languages.CODES[:5], languages.CODES[5:]]
  mapping = {c: 0 if i < 5 else 1 for i, c in enumerate(languages.CODES)}
  assert schemes.custom(lists) == schemes.custom(mapping)
  assert schemes.custom(lists).partition_of("ja") == 1


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schemes.family(3), "n=3"),
        (lambda: schemes.random(5), "n=5"),
        (lambda: schemes.random(4, seed=-1), "-1"),
        (lambda: schemes.make_scheme("alphabetical", 4), "'alphabetical'"),
        (lambda: schemes.make_scheme("per_language", 4), "num_partitions=4"),
        (
            lambda: schemes.custom([["hi", "xx"], languages.CODES[1:]]),
            "'xx'",
        ),
        (
            lambda: schemes.custom([languages.CODES, ["hi"]]),
            "'hi' is in partition 0 and partition 1",
        ),
        (lambda: schemes.custom([languages.CODES[1:]]), "['hi']"),
        (
            lambda: schemes.custom([languages.CODES, []]),
            "partition 1 is empty",
        ),
        (
            lambda: schemes.custom(
                {c: 0 if c == "hi" else 2 for c in languages.CODES}
            ),
            "partitions [1] are empty",
        ),
        (lambda: schemes.family(4).languages_of(4), "Partition 4"),
        (lambda: languages.get("klingon"), "'klingon'"),
    ],
)
def test_bad_input_raises_naming_the_value(build, message):
  with pytest.raises(ValueError) as error:
    build()
  assert message in str(error.value)
