"""The metering spool (router.meter_spool): a Redis outage spools events, recovery
replays them once each, in order. Fake stores are injected through the Meter
interface; the backoff sleep is injected, so no test waits for it. One test kills
a real redis-server (with an append-only file) and restarts it on the same port."""
import asyncio
import json
import logging
import uuid

import grpc
import pytest

from cmesh.cli import main
from cmesh.config import parse_config
from cmesh.cost import build_report, format_warning, report_from_proto, report_to_proto
from cmesh.errors import Internal, Unavailable
from loadtest.chaos_metering import RedisProcess
from protos import mesh_pb2, mesh_pb2_grpc
from router.admin import AdminServicer
from cmesh.backoff import Backoff
from router.meter_spool import REPLAY_BACKOFF, SpooledMeter
from router.metering import MemoryMeter, Meter, MeterEvent, RedisMeter, make_meter
from router.metrics import RouterMetrics

T0 = 1_700_000_000.0
CONFIG = parse_config({"models": {"m": {"source": "store://m/1", "price": {"replica_second": 1.0}}}})


def event(i: int, request_id: str | None = None) -> MeterEvent:
    return MeterEvent(request_id=request_id or f"req-{i}", tenant="acme", pipeline="p", model="m",
                      variant="default", latency_class="interactive", status="OK", input_tokens=i,
                      output_tokens=0, compute_s=0.001 * i, timestamp=T0 + i)


class FakeStore:
    """A MemoryMeter that can be taken down (record raises Unavailable, as RedisMeter
    does when Redis is unreachable), held (record waits on a gate) or made to lose
    its replies (the event counts, the caller sees an error)."""

    def __init__(self) -> None:
        self.store = MemoryMeter()
        self.up = True
        self.lose_replies = 0
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.closed = False

    async def _one(self, e: MeterEvent) -> bool:
        if not self.up:
            raise Unavailable("metering store: cannot reach Redis (fake)", component="metering")
        counted = await self.store.record(e)
        if self.lose_replies:
            self.lose_replies -= 1
            raise Unavailable("metering store: connection reset (fake)", component="metering")
        return counted

    async def record(self, e: MeterEvent) -> bool:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self._one(e)

    async def rows(self):
        return await self.store.rows()

    async def events(self, since_id=None, count=1000):
        return await self.store.events(since_id, count)

    async def close(self) -> None:
        self.closed = True

    async def ids(self) -> list[str]:
        return [s.event.request_id for s in await self.store.events(count=100_000)]


class FakeBatchStore(FakeStore):
    """Also has record_many, as RedisMeter does: in order, all or an error."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def record_many(self, events: list[MeterEvent]) -> list[bool]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append(len(events))
        return [await self._one(e) for e in events]


class ManualSleep:
    """The injected sleep: records each delay and returns only when released."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._waiting: list[asyncio.Future] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        await future

    async def release(self) -> None:
        """Let a replay task that was just started fall asleep, wake every sleeper, then
        let the loop run until someone sleeps again or all is idle."""
        await settle()
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            future.set_result(None)
        await settle()

    @property
    def sleeping(self) -> bool:
        return bool(self._waiting)


async def settle(rounds: int = 50) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spooled(store: FakeStore, **kw) -> tuple[SpooledMeter, ManualSleep]:
    sleep = ManualSleep()
    kw.setdefault("clock", FakeClock())
    return SpooledMeter(store, sleep=sleep, **kw), sleep


@pytest.fixture(params=[FakeStore, FakeBatchStore], ids=["record", "record_many"])
def store(request) -> FakeStore:
    return request.param()


def test_spooled_meter_is_a_meter_and_make_meter_builds_it(redis_url) -> None:
    assert isinstance(SpooledMeter(FakeStore()), Meter)
    built = make_meter(redis_url)
    assert isinstance(built, SpooledMeter) and isinstance(built.inner, RedisMeter)
    assert built.capacity == 200_000
    assert isinstance(make_meter(None), MemoryMeter)


def test_backoff_doubles_to_its_cap() -> None:
    assert [REPLAY_BACKOFF.delay(n) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert REPLAY_BACKOFF.delay(10_000) == 2.0
    with pytest.raises(ValueError):
        Backoff(initial_s=0)


async def test_healthy_store_is_recorded_directly(store) -> None:
    meter, sleep = spooled(store)
    assert await meter.record(event(1)) is True
    assert await meter.record(event(1)) is False          # the store's dedupe, passed through
    assert await store.ids() == ["req-1"]
    status = meter.spool_status()
    assert (status.depth, status.spooled_total, status.incomplete) == (0, 0, False)
    assert sleep.delays == []


async def test_outage_spools_and_recovery_replays_once_in_order(store) -> None:
    metrics = RouterMetrics()
    clock = FakeClock()
    meter, sleep = spooled(store, metrics=metrics, clock=clock)
    for i in range(3):
        await meter.record(event(i))
    store.up = False
    for i in range(3, 10):
        assert await meter.record(event(i)) is True         # never raises: spooled
    calls_down = store.calls
    status = meter.spool_status()
    assert (status.depth, status.spooled_total, status.store_down) == (7, 7, True)
    assert status.incomplete
    assert metrics.value("cmesh_metering_spooled_total") == 7
    assert metrics.value("cmesh_metering_spool_depth") == 7
    # Only the first failing event touched the store; the rest queued behind it.
    assert calls_down == 3 + 1
    clock.now += 3
    assert meter.spool_status().outage_s == 3

    await sleep.release()                                   # probe: still down
    await sleep.release()
    assert await store.ids() == ["req-0", "req-1", "req-2"]
    assert sleep.delays == [0.1, 0.2, 0.4]                  # backing off, not spinning

    store.up = True
    await sleep.release()
    await asyncio.wait_for(meter.drained(), 5)
    assert await store.ids() == [f"req-{i}" for i in range(10)]
    status = meter.spool_status()
    assert (status.depth, status.replayed_total, status.dropped_total, status.store_down) == (0, 7, 0, False)
    assert not status.incomplete
    assert metrics.value("cmesh_metering_replayed_total") == 7
    assert metrics.value("cmesh_metering_spool_depth") == 0
    assert sum(r.requests for r in await store.rows()) == 10
    # Healthy again: straight to the store, no sleeping.
    assert await meter.record(event(10)) is True
    assert (await store.ids())[-1] == "req-10" and not sleep.sleeping


async def test_replay_keeps_request_id_and_timestamp_and_dedupes_a_lost_reply(store) -> None:
    meter, sleep = spooled(store)
    store.lose_replies = 1                 # counted by the store, but the caller saw an error
    await meter.record(event(1))
    assert meter.spool_status().depth == 1
    await meter.record(event(2))
    await sleep.release()
    await asyncio.wait_for(meter.drained(), 5)
    stored = [s.event for s in await store.store.events()]
    assert stored == [event(1), event(2)]                  # same ids, same timestamps, once each
    assert sum(r.requests for r in await store.rows()) == 2


async def test_full_spool_drops_the_newest_and_counts_it(store, caplog) -> None:
    metrics = RouterMetrics()
    meter, sleep = spooled(store, capacity=5, metrics=metrics)
    store.up = False
    with caplog.at_level(logging.ERROR, logger="router.meter_spool"):
        results = [await meter.record(event(i)) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    status = meter.spool_status()
    assert (status.depth, status.dropped_total, status.incomplete) == (5, 3, True)
    assert metrics.value("cmesh_metering_dropped_total") == 3
    assert "spool is full (5 events)" in caplog.text
    store.up = True
    await sleep.release()
    await asyncio.wait_for(meter.drained(), 5)
    assert await store.ids() == [f"req-{i}" for i in range(5)]
    assert meter.spool_status().incomplete                 # the drops stay on the record


async def test_records_during_replay_queue_behind_it(store) -> None:
    meter, sleep = spooled(store, batch_size=4)
    store.up = False
    for i in range(10):
        await meter.record(event(i))
    store.up = True
    store.gate = asyncio.Event()                           # the replay will hang in the store
    await sleep.release()
    assert store.calls > 1                                 # a replay call is in flight
    results = await asyncio.gather(*(meter.record(event(i)) for i in range(10, 15)))
    assert results == [True] * 5
    assert await store.ids() == []                         # nothing overtook the replay
    assert meter.spool_status().depth == 15
    store.gate.set()
    await asyncio.wait_for(meter.drained(), 5)
    assert await store.ids() == [f"req-{i}" for i in range(15)]
    assert meter.spool_status().replayed_total == 15
    if isinstance(store, FakeBatchStore):
        assert store.batches[:4] == [4, 4, 4, 3]


async def test_a_late_direct_failure_goes_back_to_its_place() -> None:
    class SlowFirst(FakeStore):
        """Holds the first event's direct call until released."""

        def __init__(self) -> None:
            super().__init__()
            self.release_first = asyncio.Event()

        async def record(self, e):
            if e.request_id == "req-0" and not self.release_first.is_set():
                await self.release_first.wait()
            return await super().record(e)

    store = SlowFirst()
    meter, sleep = spooled(store)
    first = asyncio.ensure_future(meter.record(event(0)))   # direct, in flight
    await settle()
    store.up = False
    assert await meter.record(event(1)) is True              # a concurrent caller: fails, spooled
    store.release_first.set()
    assert await first is True                               # fails late: spooled ahead of req-1
    assert meter.spool_status().depth == 2
    store.up = True
    await sleep.release()
    await asyncio.wait_for(meter.drained(), 5)
    assert await store.ids() == ["req-0", "req-1"]


async def test_any_store_error_spools_and_a_bug_in_replay_does_not_strand_it() -> None:
    class Flaky(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.faults = [Internal("metering store: OOM (fake)"), RuntimeError("bug")]

        async def record(self, e):
            if self.faults:
                raise self.faults.pop(0)
            return await super().record(e)

    store = Flaky()
    meter, sleep = spooled(store)
    assert await meter.record(event(1)) is True            # Internal: spooled, not raised
    await sleep.release()                                  # RuntimeError in replay: logged, retried
    await sleep.release()
    await asyncio.wait_for(meter.drained(), 5)
    assert await store.ids() == ["req-1"]
    assert sleep.delays == [0.1, 0.2]


async def test_close_with_the_store_away_logs_and_counts_what_is_left(store, caplog) -> None:
    metrics = RouterMetrics()
    meter, sleep = spooled(store, close_timeout_s=0.2, metrics=metrics)
    store.up = False
    for i in range(3):
        await meter.record(event(i))
    with caplog.at_level(logging.ERROR, logger="router.meter_spool"):
        await asyncio.wait_for(meter.close(), 5)
    assert "3 events remain unrecorded at stop" in caplog.text
    assert store.closed
    status = meter.spool_status()
    assert (status.depth, status.dropped_total) == (0, 3)
    assert metrics.value("cmesh_metering_dropped_total") == 3
    assert await meter.record(event(9)) is False           # closed: refused and counted
    assert meter.spool_status().dropped_total == 4


async def test_close_with_a_hanging_store_is_bounded(caplog) -> None:
    store = FakeBatchStore()
    meter, sleep = spooled(store, close_timeout_s=0.1)
    store.up = False
    await meter.record(event(0))
    store.up = True
    store.gate = asyncio.Event()                           # answers never
    with caplog.at_level(logging.ERROR, logger="router.meter_spool"):
        await asyncio.wait_for(meter.close(), 5)
    assert "1 events remain unrecorded" in caplog.text and store.closed


async def test_close_flushes_at_once_when_the_store_is_back(store) -> None:
    meter, sleep = spooled(store)
    store.up = False
    for i in range(4):
        await meter.record(event(i))
    store.up = True                                       # the replay task is still asleep
    await asyncio.wait_for(meter.close(), 5)
    assert await store.ids() == [f"req-{i}" for i in range(4)]
    assert meter.spool_status().dropped_total == 0 and store.closed


async def test_cost_report_and_cli_say_when_it_is_incomplete(capsys) -> None:
    store = FakeStore()
    meter, sleep = spooled(store, capacity=2)
    await meter.record(event(1))
    store.up = False
    for i in range(2, 6):                                 # 2 spooled, 2 dropped
        await meter.record(event(i))
    store.up = True                                       # rows readable, replay still asleep

    server = grpc.aio.server()
    mesh_pb2_grpc.add_AdminServicer_to_server(AdminServicer(meter, CONFIG), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await mesh_pb2_grpc.AdminStub(channel).CostReport(
                mesh_pb2.CostReportRequest(group_by="model"), timeout=10)
        assert (response.incomplete, response.spooled_events, response.dropped_events) == (True, 2, 2)
        assert sum(r.requests for r in response.rows) == 1
        report = report_from_proto(response)
        assert report.incomplete and report_from_proto(report_to_proto(report)) == report
        warning = format_warning(report)
        assert warning.startswith("WARNING: incomplete cost report") and "2 metering events" in warning

        address = f"127.0.0.1:{port}"
        assert await asyncio.to_thread(main, ["cost", "--router", address, "--admin-key", "k"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("WARNING: incomplete cost report: 2 metering events are waiting")
        assert "2 were dropped" in out[0] and out[1].split()[0] == "pipeline"
        assert await asyncio.to_thread(main, ["cost", "--router", address, "--json", "--admin-key", "k"]) == 0
        captured = capsys.readouterr()
        assert "WARNING: incomplete" in captured.err
        data = json.loads(captured.out)
        assert (data["incomplete"], data["spooled_events"], data["dropped_events"]) == (True, 2, 2)
        await sleep.release()
        await asyncio.wait_for(meter.drained(), 5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            after = await mesh_pb2_grpc.AdminStub(channel).CostReport(
                mesh_pb2.CostReportRequest(group_by="model"), timeout=10)
        assert (after.incomplete, after.spooled_events, after.dropped_events) == (True, 0, 2)
        assert sum(r.requests for r in after.rows) == 3
    finally:
        await server.stop(grace=None)
    assert not format_warning(build_report([], CONFIG, "model"))


async def test_real_redis_killed_and_restarted_loses_nothing(tmp_path) -> None:
    redis_server = RedisProcess(tmp_path / "redis")
    prefix = f"test:spool:{uuid.uuid4().hex}"
    meter = SpooledMeter(RedisMeter(redis_server.url, prefix=prefix, timeout_s=2),
                         backoff=Backoff(initial_s=0.02, max_s=0.2), batch_size=16)
    try:
        for i in range(20):
            assert await meter.record(event(i)) is True
        redis_server.kill()                                # SIGKILL
        for i in range(20, 70):
            assert await meter.record(event(i)) is True    # spooled
        await asyncio.sleep(0.3)                           # a few failed probes
        status = meter.spool_status()
        assert status.depth == 50 and status.store_down
        await asyncio.to_thread(redis_server.start)        # same port, same append-only file
        await asyncio.wait_for(meter.drained(), 30)
        assert meter.spool_status().replayed_total == 50
        rows = await meter.rows()
        assert sum(r.requests for r in rows) == 70
        ids = [s.event.request_id for s in await meter.events(count=1000)]
        assert ids == [f"req-{i}" for i in range(70)]
        stored = [s.event for s in await meter.events(count=1000)]
        assert stored[42] == event(42)                     # original id and timestamp
        for i in range(65, 75):                            # replays and new events: once each
            await meter.record(event(i))
        assert sum(r.requests for r in await meter.rows()) == 75
    finally:
        await meter.close()
        redis_server.stop()
