"""Router queue ordering, shedding and expiry (router/queueing.py): pure, no clock."""
import random

import pytest

from router.queueing import PriorityRequestQueue, QueueEntry, make_queue


def entry(cls="interactive", deadline=None, arrival=0.0, seq=0, payload=None):
    return QueueEntry(latency_class=cls, deadline=deadline, arrival=arrival, seq=seq, payload=payload)


def drain_payloads(q):
    out = []
    while q:
        out.append(q.pop().payload)
    return out


def test_interactive_overtakes_batch_even_with_a_later_deadline() -> None:
    q = make_queue(capacity=10)
    q.push(entry("batch", deadline=1.0, arrival=0.0, payload="b"))
    q.push(entry("interactive", deadline=50.0, arrival=5.0, payload="i"))
    assert q.peek().payload == "i"
    assert drain_payloads(q) == ["i", "b"]


def test_earliest_deadline_first_within_a_class_and_no_deadline_last() -> None:
    q = make_queue(capacity=10)
    q.push(entry(deadline=None, arrival=0.0, payload="none"))
    q.push(entry(deadline=9.0, arrival=1.0, payload="d9"))
    q.push(entry(deadline=3.0, arrival=2.0, payload="d3"))
    q.push(entry("batch", deadline=2.0, arrival=0.0, payload="b2"))
    q.push(entry("batch", deadline=1.0, arrival=3.0, payload="b1"))
    assert drain_payloads(q) == ["d3", "d9", "none", "b1", "b2"]


def test_ties_break_on_arrival_then_seq_then_push_order() -> None:
    q = make_queue(capacity=10)
    q.push(entry(deadline=5.0, arrival=2.0, seq=0, payload="late"))
    q.push(entry(deadline=5.0, arrival=1.0, seq=7, payload="seq7"))
    q.push(entry(deadline=5.0, arrival=1.0, seq=3, payload="seq3"))
    q.push(entry(deadline=5.0, arrival=1.0, seq=3, payload="seq3-again"))
    assert drain_payloads(q) == ["seq3", "seq3-again", "seq7", "late"]


def test_peek_leaves_the_entry_and_empty_queue_raises() -> None:
    q = make_queue(capacity=2)
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()
    e = entry(payload="x")
    q.push(e)
    assert q.peek() is e and len(q) == 1 and e in q
    assert q.pop() is e and len(q) == 0 and not q


def test_remove_is_lazy_but_exact_and_an_entry_can_come_back_once() -> None:
    q = make_queue(capacity=10)
    a, b, c = entry(deadline=1.0, payload="a"), entry(deadline=2.0, payload="b"), entry(deadline=3.0, payload="c")
    for e in (a, b, c):
        q.push(e)
    assert q.remove(a) is True
    assert q.remove(a) is False
    assert len(q) == 2 and a not in q
    q.push(a)                          # put back (e.g. after a failed dispatch)
    with pytest.raises(ValueError):
        q.push(a)                      # but never twice
    assert drain_payloads(q) == ["a", "b", "c"]


def test_full_queue_sheds_the_worst_batch_entry_for_an_interactive_one() -> None:
    q = make_queue(capacity=3)
    early = entry("batch", deadline=10.0, arrival=0.0, payload="batch-early")
    late = entry("batch", deadline=20.0, arrival=1.0, payload="batch-late")
    inter = entry("interactive", deadline=5.0, arrival=2.0, payload="i1")
    for e in (early, late, inter):
        assert q.offer(e).accepted
    admission = q.offer(entry("interactive", deadline=6.0, arrival=3.0, payload="i2"))
    assert admission.accepted and [e.payload for e in admission.shed] == ["batch-late"]
    assert late not in q and len(q) == 3


def test_full_queue_refuses_batch_and_refuses_interactive_when_no_batch_is_left() -> None:
    q = make_queue(capacity=2)
    assert q.offer(entry("batch", deadline=1.0, payload="b")).accepted
    assert q.offer(entry("interactive", payload="i1")).accepted
    refused = q.offer(entry("batch", deadline=0.5, payload="b-urgent"))
    assert not refused.accepted and refused.shed == ()           # batch never displaces anything
    assert q.offer(entry("interactive", payload="i2")).shed[0].payload == "b"
    refused = q.offer(entry("interactive", payload="i3"))
    assert not refused.accepted and refused.shed == ()
    assert sorted(drain_payloads(q)) == ["i1", "i2"]


def test_the_worst_batch_entry_is_the_one_without_deadline_then_the_newest() -> None:
    q = make_queue(capacity=3)
    q.offer(entry("batch", deadline=100.0, arrival=0.0, payload="d100"))
    q.offer(entry("batch", deadline=None, arrival=1.0, payload="none-old"))
    q.offer(entry("batch", deadline=None, arrival=2.0, payload="none-new"))
    shed = [q.offer(entry("interactive", arrival=3.0 + i)).shed[0].payload for i in range(3)]
    assert shed == ["none-new", "none-old", "d100"]


def test_a_removed_batch_entry_is_not_shed_twice() -> None:
    q = make_queue(capacity=2)
    b = entry("batch", deadline=9.0, payload="b")
    q.offer(b)
    q.offer(entry("batch", deadline=1.0, payload="keep"))
    q.remove(b)
    assert q.offer(entry("interactive", payload="i")).shed == ()    # there was room after the removal
    assert q.count("batch") == 1 and q.count("interactive") == 1


def test_expire_removes_due_entries_in_deadline_order() -> None:
    q = make_queue(capacity=10)
    q.push(entry(deadline=3.0, payload="d3"))
    q.push(entry("batch", deadline=1.0, payload="b1"))
    q.push(entry(deadline=None, payload="none"))
    gone = entry(deadline=0.5, payload="removed")
    q.push(gone)
    q.remove(gone)
    q.push(entry(deadline=7.0, payload="d7"))
    assert [e.payload for e in q.expire(now=0.9)] == []
    assert [e.payload for e in q.expire(now=3.0)] == ["b1", "d3"]    # a deadline at now is spent
    assert drain_payloads(q) == ["d7", "none"]


def test_validation() -> None:
    with pytest.raises(ValueError, match="latency_class"):
        entry("urgent")
    with pytest.raises(ValueError, match="capacity"):
        PriorityRequestQueue(0)


def test_heaps_stay_bounded_when_callers_keep_giving_up() -> None:
    q = make_queue(capacity=100)
    keep = entry(deadline=1e9, payload="keep")
    q.push(keep)
    for i in range(10_000):
        e = entry("batch", deadline=float(i), arrival=float(i))
        q.push(e)
        q.remove(e)
    assert len(q) == 1
    assert max(len(q._order), len(q._batch_worst), len(q._by_deadline)) <= 2 * len(q) + 64
    assert q.pop() is keep


def test_matches_a_sorted_reference_under_random_operations() -> None:
    rng = random.Random(7)
    q = make_queue(capacity=50)
    live: list[QueueEntry] = []
    key = lambda e: (e.latency_class != "interactive", e.deadline_key, e.arrival, e.seq)  # noqa: E731
    for step in range(5_000):
        op = rng.random()
        if op < 0.5:
            e = entry(rng.choice(["interactive", "batch"]),
                      deadline=None if rng.random() < 0.2 else rng.uniform(0, 100),
                      arrival=float(step), seq=step)
            admission = q.offer(e)
            if admission.accepted:
                live.append(e)
            for shed in admission.shed:
                assert shed.latency_class == "batch" and e.latency_class == "interactive"
                worst = max((x for x in live if x.latency_class == "batch" and x is not e),
                            key=lambda x: (x.deadline_key, x.arrival, x.seq))
                assert shed is worst
                live.remove(shed)
        elif op < 0.7 and live:
            victim = rng.choice(live)
            assert q.remove(victim)
            live.remove(victim)
        elif op < 0.8:
            now = rng.uniform(0, 30)
            expired = q.expire(now)
            assert {id(e) for e in expired} == {id(e) for e in live if e.deadline is not None and e.deadline <= now}
            live = [e for e in live if not (e.deadline is not None and e.deadline <= now)]
        elif live:
            best = min(live, key=key)
            assert q.pop() is best
            live.remove(best)
        assert len(q) == len(live) <= 50
