"""Exactly-once metering on both stores: the in-process MemoryMeter and RedisMeter
over a real redis-server (the session fixture `redis_url`)."""
import asyncio
import itertools
import uuid

import pytest
import redis.asyncio as aredis

from cmesh.config import parse_config
from cmesh.cost import GROUP_BY, build_report
from cmesh.errors import Unavailable
from meshtest import free_port
from router.meter_spool import SpooledMeter
from router.metering import (MemoryMeter, Meter, MeterEvent, RedisMeter, decode_key, encode_key,
                             make_meter, redact_url)

T0 = 1_700_000_000.0

CONFIG = parse_config({"models": {
    "embedder": {"source": "store://minilm-l6/1", "price": {"replica_second": 0.00011}},
    "llm": {"variants": {"a": {"source": "store://tiny-llm/1"}, "b": {"source": "store://tiny-llm/2"}},
            "price": {"replica_second": 0.0005, "per_1k_tokens": 0.0004}}}})


def event(request_id: str, *, tenant="acme", pipeline="support-agent", model="embedder",
          variant="default", latency_class="interactive", status="OK", input_tokens=10,
          output_tokens=0, compute_s=0.002, timestamp=T0) -> MeterEvent:
    return MeterEvent(request_id=request_id, tenant=tenant, pipeline=pipeline, model=model,
                      variant=variant, latency_class=latency_class, status=status,
                      input_tokens=input_tokens, output_tokens=output_tokens, compute_s=compute_s,
                      timestamp=timestamp)


def workload(n: int = 200) -> list[MeterEvent]:
    """A deterministic mix of dimensions, statuses and awkward compute values."""
    tenants = ["acme", "globex", ""]
    pipelines = ["support-agent", "", "code:review|v2"]
    models = [("embedder", "default"), ("llm", "a"), ("llm", "b"), ("ghost", "default")]
    statuses = ["OK", "OK", "OK", "UNAVAILABLE"]
    out = []
    for i in range(n):
        model, variant = models[i % len(models)]
        out.append(event(f"req-{i}", tenant=tenants[i % 3], pipeline=pipelines[(i // 3) % 3],
                         model=model, variant=variant, status=statuses[(i // 2) % 4],
                         latency_class="batch" if i % 7 == 0 else "interactive",
                         input_tokens=i % 13, output_tokens=(i * 7) % 29,
                         compute_s=0.0001 * i + 1e-7, timestamp=T0 + i))
    return out


def expected_rows(events: list[MeterEvent]) -> dict[tuple, tuple]:
    totals: dict[tuple, list] = {}
    for e in events:
        t = totals.setdefault(e.key(), [0, 0, 0, 0])
        t[0] += 1
        t[1] += e.input_tokens
        t[2] += e.output_tokens
        t[3] += e.compute_ns
    return {k: tuple(v) for k, v in totals.items()}


def as_dict(rows) -> dict[tuple, tuple]:
    return {r.key(): (r.requests, r.input_tokens, r.output_tokens, r.compute_ns) for r in rows}


def new_redis_meter(redis_url: str, **kw) -> RedisMeter:
    return RedisMeter(redis_url, prefix=f"test:meter:{uuid.uuid4().hex}", **kw)


@pytest.fixture(params=["memory", "redis"])
async def meter(request, redis_url):
    m = MemoryMeter() if request.param == "memory" else new_redis_meter(redis_url)
    yield m
    await m.close()


def test_both_meters_satisfy_the_protocol(redis_url) -> None:
    assert isinstance(MemoryMeter(), Meter)
    assert isinstance(RedisMeter(redis_url), Meter)
    assert isinstance(make_meter(None), MemoryMeter)
    spooled = make_meter(redis_url)
    assert isinstance(spooled, SpooledMeter) and isinstance(spooled.inner, RedisMeter)


async def test_duplicate_request_id_is_counted_once(meter) -> None:
    assert await meter.record(event("r1", input_tokens=5)) is True
    # A retry of the same request, even with different numbers, does not count again.
    assert await meter.record(event("r1", input_tokens=500, status="UNAVAILABLE")) is False
    rows = await meter.rows()
    assert len(rows) == 1
    assert (rows[0].status, rows[0].requests, rows[0].input_tokens) == ("OK", 1, 5)
    assert [s.event.request_id for s in await meter.events()] == ["r1"]


async def test_fifty_concurrent_records_of_one_id_count_once(meter) -> None:
    results = await asyncio.gather(*(meter.record(event("same", compute_s=0.5 + i))
                                     for i in range(50)))
    assert sorted(results) == [False] * 49 + [True]
    rows = await meter.rows()
    assert [(r.requests, r.input_tokens) for r in rows] == [(1, 10)]
    stored = await meter.events()
    assert len(stored) == 1 and stored[0].event.request_id == "same"
    # The one counted event is the one whose row numbers we see.
    assert rows[0].compute_ns == stored[0].event.compute_ns


async def test_concurrent_distinct_ids_give_exact_totals(meter) -> None:
    events = workload(200)
    duplicates = events[::5]                      # retries interleaved with first attempts
    results = await asyncio.gather(*(meter.record(e) for e in [*events, *duplicates]))
    assert sum(results) == 200
    assert as_dict(await meter.rows()) == expected_rows(events)
    stored = await meter.events(count=10_000)
    assert len(stored) == 200
    assert sorted(s.event.request_id for s in stored) == sorted(e.request_id for e in events)


async def test_events_round_trip_and_page(meter) -> None:
    events = workload(25)
    for e in events:
        await meter.record(e)
    first = await meter.events(count=10)
    second = await meter.events(since_id=first[-1].id, count=10)
    rest = await meter.events(since_id=second[-1].id)
    read = [s.event for s in first + second + rest]
    assert len(read) == 25 and len({s.id for s in first + second + rest}) == 25
    for got, sent in zip(read, events):
        assert got.key() == sent.key() and got.request_id == sent.request_id
        assert (got.input_tokens, got.output_tokens, got.compute_ns, got.timestamp) == \
            (sent.input_tokens, sent.output_tokens, sent.compute_ns, sent.timestamp)
    assert await meter.events(since_id=rest[-1].id) == []


async def test_separator_characters_never_merge_rows(meter) -> None:
    # Naive "a:b" joining would map both of these to the same key.
    await meter.record(event("x1", tenant="a:b", pipeline="c"))
    await meter.record(event("x2", tenant="a", pipeline="b:c"))
    await meter.record(event("x3", tenant="t|1", pipeline='quote"d\\ and é'))
    keys = {(r.tenant, r.pipeline) for r in await meter.rows()}
    assert keys == {("a:b", "c"), ("a", "b:c"), ("t|1", 'quote"d\\ and é')}


def test_key_encoding_round_trips() -> None:
    key = ("a:b", "c|d", '"', "", "é", "OK")
    assert decode_key(encode_key(key)) == key
    assert encode_key(("a:b", "c", "", "", "", "")) != encode_key(("a", "b:c", "", "", "", ""))
    with pytest.raises(ValueError):
        decode_key('["too","short"]')


async def test_memory_and_redis_give_the_same_report(redis_url) -> None:
    events = workload(300)
    sequence = [*events, *events[10:40], *events[:3]]          # with retries
    memory, shared = MemoryMeter(), new_redis_meter(redis_url)
    try:
        for e in sequence:
            await memory.record(e)
            await shared.record(e)
        mem_rows, redis_rows = await memory.rows(), await shared.rows()
        assert mem_rows == redis_rows
        for group_by in GROUP_BY:
            assert build_report(mem_rows, CONFIG, group_by) == build_report(redis_rows, CONFIG, group_by)
        # Row order from the store must not matter either.
        assert build_report(list(reversed(redis_rows)), CONFIG, "model") == \
            build_report(mem_rows, CONFIG, "model")
    finally:
        await shared.close()


async def test_tiny_compute_shares_add_up_exactly(meter) -> None:
    # 1000 requests of 0.3 µs each (a small model's share of a big batch).
    await asyncio.gather(*(meter.record(event(f"t{i}", compute_s=3e-7)) for i in range(1000)))
    (row,) = await meter.rows()
    assert row.compute_ns == 300_000 and row.compute_s == pytest.approx(3e-4)


async def test_redis_layout_and_dedupe_ttl(redis_url) -> None:
    m = new_redis_meter(redis_url, dedupe_ttl_s=120, stream_maxlen=1000)
    client = aredis.from_url(redis_url, decode_responses=True)
    try:
        await m.record(event("k1", tenant="a:b", input_tokens=3, output_tokens=4, compute_s=1.5))
        assert 0 < await client.ttl(f"{m.prefix}:seen:k1") <= 120
        (row_key,) = await client.smembers(f"{m.prefix}:rows")
        assert row_key == f"{m.prefix}:row:" + encode_key(
            ("a:b", "support-agent", "embedder", "default", "interactive", "OK"))
        assert await client.hgetall(row_key) == {"requests": "1", "input_tokens": "3",
                                                 "output_tokens": "4", "compute_ns": "1500000000"}
        assert await client.xlen(f"{m.prefix}:events") == 1
    finally:
        await client.aclose()
        await m.close()


async def test_memory_meter_forgets_ids_by_event_time_and_count() -> None:
    m = MemoryMeter(dedupe_ttl_s=60, max_seen=3)
    assert await m.record(event("a", timestamp=T0))
    assert not await m.record(event("a", timestamp=T0 + 59))
    assert await m.record(event("a", timestamp=T0 + 61))      # past the window: a new request
    for i, rid in enumerate(["b", "c", "d"]):
        await m.record(event(rid, timestamp=T0 + 62 + i))
    assert len(m._seen) <= 3
    assert await m.record(event("a", timestamp=T0 + 70))      # evicted by the count bound
    log = MemoryMeter(stream_maxlen=5)
    for i in range(8):
        await log.record(event(f"e{i}"))
    assert [s.event.request_id for s in await log.events()] == [f"e{i}" for i in range(3, 8)]


async def test_unreachable_redis_is_unavailable_naming_the_url() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    m = RedisMeter(url, timeout_s=2)
    try:
        for call in (m.record(event("u1")), m.rows(), m.events()):
            with pytest.raises(Unavailable) as info:
                await call
            assert "127.0.0.1" in info.value.message and "s3cret" not in info.value.message
            assert info.value.code.name == "UNAVAILABLE"
    finally:
        await m.close()


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://u:pw@h:6379/1") == "redis://u:***@h:6379/1"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize("bad, field", [({"input_tokens": -1}, "input_tokens"),
                                        ({"compute_s": float("nan")}, "compute_s"),
                                        ({"status": ""}, "status")])
def test_bad_events_are_refused(bad, field) -> None:
    with pytest.raises(ValueError, match=field):
        event("r", **bad)
    with pytest.raises(ValueError, match="request_id"):
        event("")


def test_workload_is_varied() -> None:
    # Guards the tests above against a workload that collapses to one row.
    assert len(expected_rows(workload(200))) > 20
    assert {e.status for e in workload(8)} == {"OK", "UNAVAILABLE"}
    assert len(set(itertools.chain.from_iterable(e.key() for e in workload(50)))) > 10
