"""Tests for tiered_routing.unlearning.exact (SISA bookkeeping)."""

import numpy as np
import pytest

from tiered_routing.tier1 import languages
from tiered_routing.tier1 import schemes
from tiered_routing.unlearning import exact


def _task(code):
  return f"tr.sample.{code}_v1"


def test_owner_and_retain_mixture_family4():
  scheme = schemes.family(4)
  # ur is in the west_asian block: ar, fa, ur, kk = partition 2.
  assert exact.owning_partitions(scheme, "ur") == (2,)
  assert exact.retain_languages(scheme, "ur") == ("ar", "fa", "kk")
  assert exact.retain_mixture(scheme, "ur", _task) == (
      "tr.sample.ar_v1",
      "tr.sample.fa_v1",
      "tr.sample.kk_v1",
  )


def test_drop_partition_keeps_ids_and_marks_unroutable():
  scheme = schemes.family(4)
  table = exact.drop_partition(scheme, "ur")
  assert table.name == "family4-ur"
  assert table.partitions[2] == ("ar", "fa", "kk")
  assert table.partitions[:2] == scheme.partitions[:2]
  assert table.forgotten == ("ur",)
  assert table.dropped_partitions == ()
  assert table.partition_of("fa") == 2
  assert not table.is_routable("ur")
  with pytest.raises(ValueError, match="'ur' was forgotten"):
    table.partition_of("ur")
  want = scheme.language_to_partition_table().copy()
  want[languages.language_id("ur")] = exact.UNROUTABLE
  np.testing.assert_array_equal(table.language_to_partition_table(), want)
  assert table.as_dict()["ur"] == -1 and table.as_dict()["en"] == 3


def test_per_language_scheme_drops_the_partition():
  scheme = schemes.per_language()
  p = exact.plan(scheme, "ur", _task)
  assert p.partition == languages.language_id("ur")
  assert p.action == "drop"
  assert p.retain_languages == () and p.retain_tasks == ()
  assert p.routing.dropped_partitions == (p.partition,)
  assert p.routing.num_partitions == 16
  assert p.routing.partition_of("kk") == languages.language_id("kk")


def test_plan_retrain_and_forgetting_twice():
  scheme = schemes.custom(
      [["ur", "hi"]] + [[c] for c in languages.CODES if c not in ("ur", "hi")],
      name="c",
  )
  p = exact.plan(scheme, "ur", _task)
  assert (p.partition, p.action, p.retain_tasks) == (
      0,
      "retrain",
      ("tr.sample.hi_v1",),
  )
  p2 = exact.plan(p.routing, "hi", _task)
  assert p2.action == "drop"
  assert p2.routing.name == "c-ur-hi"
  assert p2.routing.forgotten == ("ur", "hi")
  assert p2.routing.dropped_partitions == (0,)
  assert exact.forget_all(scheme, ["ur", "hi"]) == p2.routing
  with pytest.raises(ValueError, match="'ur' was forgotten"):
    exact.plan(p.routing, "ur", _task)


def test_validation_names_bad_values():
  scheme = schemes.family(4)
  with pytest.raises(ValueError, match="'xx'"):
    exact.owning_partitions(scheme, "xx")
  with pytest.raises(ValueError, match="returned ''"):
    exact.retain_mixture(scheme, "ur", lambda c: "")
  with pytest.raises(ValueError, match="duplicate"):
    exact.retain_mixture(scheme, "ur", lambda c: "same")
  with pytest.raises(ValueError, match="got dict"):
    exact.owning_partitions({"ur": 0}, "ur")
  parts = scheme.partitions
  with pytest.raises(
      ValueError, match="'ur' is in partition 2 and in " "forgotten"
  ):
    exact.RoutingTable("t", parts, ("ur",))
  with pytest.raises(ValueError, match=r"\['ur'\] are neither"):
    exact.RoutingTable("t", parts[:2] + (("ar", "fa", "kk"),) + parts[3:])
  with pytest.raises(ValueError, match="no partitions"):
    exact.RoutingTable("t", ())
