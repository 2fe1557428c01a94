"""Replica choice (router/dispatch.py): least loaded, spill-over, fall-back."""
import pytest

from router.dispatch import Choice, ReplicaView, choose, has_any_replica


def d(rid, in_flight, cap=10, **kw):
    return ReplicaView(rid, "dedicated", in_flight, cap, **kw)


def s(rid, in_flight, cap=10, **kw):
    return ReplicaView(rid, "serverless", in_flight, cap, **kw)


def test_dedicated_mode_picks_the_least_loaded_dedicated_replica() -> None:
    replicas = [d("a", 5), d("b", 2), d("c", 9), s("x", 0)]
    assert choose(replicas, "dedicated") == Choice("b", spilled=False)


def test_load_is_relative_to_the_cap_and_ties_are_deterministic() -> None:
    # b has more in flight but a bigger cap: 3/12 < 2/4
    assert choose([d("a", 2, cap=4), d("b", 3, cap=12)], "dedicated").replica_id == "b"
    # equal load 0.5: fewer in flight wins, then the id
    assert choose([d("a", 2, cap=4), d("b", 1, cap=2)], "dedicated").replica_id == "b"
    assert choose([d("b", 1), d("a", 1)], "dedicated").replica_id == "a"


def test_only_ready_unejected_unexcluded_replicas_with_room_are_candidates() -> None:
    replicas = [d("busy", 10), d("cold", 0, ready=False), d("sick", 0, ejected=True),
                d("tried", 0), d("ok", 9)]
    assert choose(replicas, "dedicated", exclude={"tried"}).replica_id == "ok"
    assert choose(replicas, "dedicated", exclude={"tried", "ok"}) is None


def test_serverless_mode_ignores_the_dedicated_pool() -> None:
    assert choose([d("a", 0), s("x", 3), s("y", 1)], "serverless") == Choice("y", spilled=False)
    assert choose([d("a", 0)], "serverless") is None


def test_auto_stays_dedicated_below_the_threshold_and_spills_at_it() -> None:
    serverless = [s("x", 4), s("y", 1)]
    assert choose([d("a", 7)] + serverless, "auto", 0.8) == Choice("a", spilled=False)   # 7 < 8
    assert choose([d("a", 8)] + serverless, "auto", 0.8) == Choice("y", spilled=True)    # 8 = 0.8 * 10
    # the least-loaded dedicated replica decides: one under the threshold keeps traffic home
    assert choose([d("a", 9), d("b", 3)] + serverless, "auto", 0.8) == Choice("b")


def test_auto_falls_back_to_dedicated_up_to_the_hard_cap_without_serverless_room() -> None:
    assert choose([d("a", 9), s("x", 10)], "auto", 0.8) == Choice("a", spilled=False)
    assert choose([d("a", 9), s("x", 0, ready=False)], "auto", 0.8) == Choice("a", spilled=False)
    assert choose([d("a", 10), s("x", 10)], "auto", 0.8) is None


def test_auto_with_only_serverless_replicas_spills() -> None:
    assert choose([s("x", 0)], "auto", 0.8) == Choice("x", spilled=True)


def test_has_any_replica_separates_waiting_for_capacity_from_warming() -> None:
    assert has_any_replica([d("a", 10), s("x", 10)])                  # all full: wait
    assert has_any_replica([d("a", 0, ejected=True)])                 # ejection ends by itself
    assert not has_any_replica([])
    assert not has_any_replica([d("a", 0, ready=False), s("x", 0, ready=False)])
    assert not has_any_replica([s("x", 0)], mode="dedicated")
    assert has_any_replica([s("x", 0)], mode="serverless")


def test_validation() -> None:
    with pytest.raises(ValueError, match="pool"):
        ReplicaView("a", "spot", 0, 1)
    with pytest.raises(ValueError, match="cap"):
        d("a", 0, cap=0)
    with pytest.raises(ValueError, match="in_flight"):
        d("a", -1)
    with pytest.raises(ValueError, match="mode"):
        choose([d("a", 0)], "fastest")
    with pytest.raises(ValueError, match="capacity_threshold"):
        choose([d("a", 0)], "auto", 1.5)
