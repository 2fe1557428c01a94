"""Leader election through a lease in a real Redis: one leads, a standby takes over."""
import asyncio
import itertools
import uuid

import pytest
import redis.asyncio as aredis

from autoscaler.leader import LeaderLease, LocalLease, make_lease

TTL = 0.5
_keys = itertools.count()


@pytest.fixture
def key() -> str:
    return f"test:leader:{uuid.uuid4().hex[:8]}:{next(_keys)}"


@pytest.fixture
async def leases(redis_url, key):
    made: list[LeaderLease] = []

    def make(holder: str, **kw) -> LeaderLease:
        lease = LeaderLease(redis_url, key=key, holder_id=holder, ttl_s=kw.pop("ttl_s", TTL), **kw)
        made.append(lease)
        return lease

    yield make
    for lease in made:
        await lease.close()


class Watcher:
    """Records transitions of one lease's run() loop as events."""

    def __init__(self) -> None:
        self.elected = asyncio.Event()
        self.lost = asyncio.Event()

    def on_elected(self) -> None:
        self.elected.set()

    async def on_lost(self) -> None:
        self.lost.set()


async def test_only_one_of_two_leads(leases) -> None:
    a, b = leases("a"), leases("b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert a.is_leader and not b.is_leader
    assert await b.holder() == "a"
    assert await a.try_acquire()                 # acquiring what we hold just extends it


async def test_standby_takes_over_after_the_leader_dies(leases) -> None:
    a, b = leases("a"), leases("b")
    wa, wb = Watcher(), Watcher()
    task_a = asyncio.create_task(a.run(wa.on_elected, wa.on_lost))
    await asyncio.wait_for(wa.elected.wait(), 5)
    task_b = asyncio.create_task(b.run(wb.on_elected, wb.on_lost))
    try:
        await asyncio.sleep(TTL * 2)             # a keeps renewing: b stays a standby
        assert not wb.elected.is_set() and await b.holder() == "a"
        task_a.cancel()                          # death: no release
        with pytest.raises(asyncio.CancelledError):
            await task_a
        assert await b.holder() == "a"           # the lease outlives its holder until the TTL
        await asyncio.wait_for(wb.elected.wait(), 5)
        assert await b.holder() == "b" and b.is_leader
        # The old leader, back from the dead, finds the lease gone.
        assert not await a.renew() and not a.is_leader
        assert await b.holder() == "b"
    finally:
        task_b.cancel()
        await asyncio.gather(task_b, return_exceptions=True)


async def test_renew_after_loss_returns_false(leases) -> None:
    a, b = leases("a"), leases("b")
    assert await a.try_acquire()
    await asyncio.sleep(TTL * 1.5)               # a missed its renewals: the key expired
    assert await b.try_acquire()
    assert not await a.renew()
    assert not a.is_leader
    assert await b.holder() == "b"
    assert not await a.release()                 # compare-and-delete: b's lease survives
    assert await b.holder() == "b"


async def test_release_hands_over_immediately(leases) -> None:
    a, b = leases("a"), leases("b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert await a.release()
    assert not a.is_leader
    assert await b.try_acquire()


async def test_run_reports_loss_when_the_lease_is_taken(leases, redis_url, key) -> None:
    a = leases("a")
    wa = Watcher()
    task = asyncio.create_task(a.run(wa.on_elected, wa.on_lost))
    try:
        await asyncio.wait_for(wa.elected.wait(), 5)
        # Someone else owns the key now (as after a partition healed).
        client = aredis.Redis.from_url(redis_url, decode_responses=True)
        await client.set(key, "usurper", px=60_000)
        await client.aclose()
        await asyncio.wait_for(wa.lost.wait(), 5)
        assert not a.is_leader
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_clean_release_after_cancel_hands_over_at_once(leases) -> None:
    # A 30 s TTL: only the release can let b in right away.
    a, b = leases("a", ttl_s=30.0), leases("b", ttl_s=30.0)
    wa = Watcher()
    task_a = asyncio.create_task(a.run(wa.on_elected, wa.on_lost))
    await asyncio.wait_for(wa.elected.wait(), 5)
    task_a.cancel()
    await asyncio.gather(task_a, return_exceptions=True)
    assert not await b.try_acquire()             # cancelling alone keeps the lease (like a death)
    await a.release()
    assert await b.try_acquire()


async def test_local_deadline_ends_leadership_without_redis(leases) -> None:
    now = [100.0]
    a = leases("a", clock=lambda: now[0])
    assert await a.try_acquire() and a.is_leader
    now[0] += TTL - 0.01
    assert a.is_leader
    now[0] += 0.02                               # past the TTL on our clock: stop acting
    assert not a.is_leader


async def test_failing_on_elected_releases_the_lease(leases) -> None:
    a, b = leases("a", ttl_s=30.0), leases("b", ttl_s=30.0)

    def boom() -> None:
        raise RuntimeError("cannot start")

    with pytest.raises(RuntimeError):
        await asyncio.wait_for(a.run(boom, lambda: None), 5)
    assert await b.try_acquire()


async def test_local_lease_always_leads() -> None:
    lease = make_lease(None, holder_id="solo")
    assert isinstance(lease, LocalLease) and lease.is_leader and lease.holder_id == "solo"
    assert await lease.try_acquire() and await lease.renew() and await lease.release()
    elected = asyncio.Event()
    task = asyncio.create_task(lease.run(elected.set, lambda: None))
    await asyncio.wait_for(elected.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await lease.close()


async def test_make_lease_with_redis(redis_url) -> None:
    lease = make_lease(redis_url, ttl_s=1.0)
    assert isinstance(lease, LeaderLease) and lease.holder_id
    await lease.close()
