"""The ``sql-sqlite`` engine under hostile input: every statement stops at its
deadline or fails fast, slow queries do not hold up others, and every bad input is
INVALID_ARGUMENT naming its field, alone, over the wire too."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient
from cmesh.errors import DeadlineExceeded, InvalidInput
from meshtest import mesh_config, running_server
from model_server.engines.base import InferItem
from model_server.engines.sql_limits import Limits, json_too_deep, printf_size

BY_ID = "SELECT order_id FROM orders WHERE order_id = :id"
# Counts to 10^9: minutes of work, so only the deadline can end it.
SLOW = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000000000) "
        "SELECT count(*) AS c FROM n")
# One C call with a billion-step loop: it never reaches the progress handler.
HUGE_PRINTF = "SELECT length(printf('%.*c',1000000000,'x'))"
DEEP_PARAMS = "[" * 100000 + "]" * 100000


# The store, engine factory and engine fixture of the engine's own tests.
from test_sql_engine import engine, make_engine, sql_store  # noqa: E402,F401


def request(engine, *queries, params=None) -> InferItem:
    inputs = {"query": np.array([q if isinstance(q, bytes) else q.encode() for q in queries],
                                dtype=object)}
    if params is not None:
        inputs["params"] = np.array([p if isinstance(p, bytes) else json.dumps(p).encode()
                                     for p in params], dtype=object)
    return engine.prepare(inputs, {})


def run_one(engine, query, params=None):
    return engine.run_batch([request(engine, query, params=params)])[0]


def rows_of(result) -> list:
    assert result.error is None, result.error
    return json.loads(result.outputs["rows"][0])


def assert_invalid(result_or_error, field: str, *fragments: str) -> None:
    error = getattr(result_or_error, "error", result_or_error)
    assert isinstance(error, InvalidInput), error
    assert error.field == field, error
    for fragment in fragments:
        assert fragment in error.message, error.message


class GatedClock:
    """Time stands still until ``gate()`` holds, then runs on from far ahead: a query
    can only pass its deadline once the gate opened. ``backstop_s`` of real time
    opens it anyway, so a broken engine fails the test instead of hanging it."""

    def __init__(self, gate: Callable[[], bool], backstop_s: float = 10.0) -> None:
        self.gate, self.backstop_s = gate, backstop_s
        self.started = time.monotonic()
        self.threads: set[int] = set()
        self.opened_by: str | None = None
        self.read = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.read.set()
            self.threads.add(threading.get_ident())
            if self.opened_by is None:
                if self.gate():
                    self.opened_by = "gate"
                elif time.monotonic() - self.started > self.backstop_s:
                    self.opened_by = "backstop"
            return 0.0 if self.opened_by is None else 1e9 + time.monotonic()


# -- 1. the deadline holds for every statement ---------------------------------------------

@pytest.mark.parametrize("sql, function", [
    (HUGE_PRINTF, "printf()"),
    ("SELECT length(printf('%.1000000000c', 'x'))", "printf()"),   # precision in the format
    ("SELECT length(format('%5.*c', 1000000000, 'x'))", "format()"),
    ("SELECT length(printf('%d %s %.*c', 1, 'a', 300000000, 'x'))", "printf()"),
])
def test_huge_printf_fails_fast_naming_query(engine, sql, function):
    assert_invalid(run_one(engine, sql), "query", "string or blob too big", function)


@pytest.mark.parametrize("sql", [
    "SELECT length(zeroblob(1000000000))",
    "SELECT length(randomblob(1000000000))",
    "SELECT length(replace(hex(zeroblob(16000)), '0', '00000000'))",
])
def test_length_limit_stops_builtins_that_grow_values(engine, sql):
    assert_invalid(run_one(engine, sql), "query", "too big")


def test_quadratic_trim_is_refused(engine):
    sql = ("SELECT length(ltrim(printf('%.*c', 30000, 'a'), printf('%.*c', 2000, 'b') || 'a')) "
           "AS n")
    assert_invalid(run_one(engine, sql), "query", "ltrim()", "too much work")
    assert rows_of(run_one(engine, "SELECT ltrim('xxabc', 'x') AS t")) == [{"t": "abc"}]


def test_a_row_of_expensive_calls_stops_at_the_deadline(sql_store):
    # Each instr() is one VM step: the progress handler never runs inside the row,
    # so the calls themselves must look at the deadline. The clock moves 0.1 s a read.
    e = make_engine(sql_store)
    try:
        ticks = iter(range(10**6))
        e.clock = lambda: next(ticks) * 0.1
        calls = " + ".join(["instr(x, y)"] * 40)   # '000...0' searched for '00...01'
        sql = (f"SELECT {calls} AS n FROM (SELECT hex(zeroblob(10000)) AS x, "
               "substr(hex(zeroblob(5000)), 2) || '1' AS y)")
        result = run_one(e, sql)
        assert isinstance(result.error, DeadlineExceeded), result.error
        assert result.error.field == "query"
    finally:
        e.unload()


def test_like_comparisons_per_statement_are_capped(engine):
    def where(n: int) -> str:
        return " OR ".join(["customer_email LIKE :p"] * n)

    in_where = Limits.pattern_calls // 2       # recompiled once :p is bound: counted twice
    for sql in (f"SELECT count(*) AS n FROM orders WHERE {where(in_where + 1)}",
                f"SELECT {where(Limits.pattern_calls + 1)} AS hit FROM orders"):
        assert_invalid(run_one(engine, sql, params=[{"p": "%maya%"}]), "query", "LIKE/GLOB")
    for sql in (f"SELECT count(*) AS n FROM orders WHERE {where(in_where)}",
                f"SELECT count(*) AS n FROM orders WHERE ({where(Limits.pattern_calls)}) > 0"):
        assert rows_of(run_one(engine, sql, params=[{"p": "%maya.patel%"}]))[0]["n"] >= 1


def test_result_size_is_capped(engine):
    result = run_one(engine, "SELECT printf('%.*c', 30000, 'x') AS big FROM orders")
    assert_invalid(result, "query", "max_result_bytes")


def test_guarded_builtins_answer_as_sqlite_does(engine):
    sql = ("SELECT printf('%05.1f|%-4s|%,d', 3.14159, 'ab', 1234567) AS p, format('%.3c', '*') AS f, "
           "instr('hello', 'll') AS i, replace('a-b-c', '-', '+') AS r, trim('xxhixx', 'x') AS t, "
           "rtrim('hi!!', '!') AS rt, printf(NULL) AS n, typeof(instr(x'0102', x'02')) AS bt")
    assert rows_of(run_one(engine, sql)) == [{"p": "003.1|ab  |1,234,567", "f": "***", "i": 3,
                                              "r": "a+b+c", "t": "hi", "rt": "hi", "n": None,
                                              "bt": "integer"}]


@pytest.mark.parametrize("fmt, args, size", [
    ("%.*c", [5, "x"], 5),
    ("%5d", [1], 5),
    ("%-*.*s", [10, 3, "abc"], 10),         # precision of %s is a maximum, not a size
    ("%.1000000000c", ["x"], 10**9),
    ("%d%.*c", [1, 9, "x"], 9),             # the value of %d comes before the next *
    ("%%%.*c", [7, "x"], 7),                # %% takes no argument
    ("%lld%.*c", [1, 4, "x"], 4),
    ("%y%.*c", [10**9, "x"], 0),            # SQLite stops at an unknown conversion
    ("%.*c", ["1e9", "x"], 10**9),          # text read the larger way
    ("%.*c", [-12, "x"], 12),               # a negative precision counts by its size
    ("%.*c%.*c", [3, "x"], 3),              # missing arguments read as 0
    ("plain text", [], 0),
])
def test_printf_size(fmt, args, size):
    assert printf_size(fmt, args) == size


@pytest.mark.parametrize("fmt, args", [
    ("%.*c", [40, "x"]), ("%08.3f", [2.5]), ("%-6d|", [-3]), ("%.5d", [42]), ("%#x", [255]),
    ("%!.3c%%", ["é"]), ("%10.2e", [12345.678]), ("%*s", [-7, "ab"]), ("%.20s", ["short"]),
])
def test_printf_size_is_a_lower_bound_of_what_sqlite_writes(fmt, args):
    conn = sqlite3.connect(":memory:")
    try:
        out = conn.execute(f"SELECT printf(?{', ?' * len(args)})", [fmt, *args]).fetchone()[0]
    finally:
        conn.close()
    assert len(out) >= printf_size(fmt, args)


def test_runtime_refusals_fail_only_their_item(engine):
    items = [request(engine, HUGE_PRINTF), request(engine, BY_ID, params=[{"id": 1042}]),
             request(engine, "SELECT ltrim(printf('%.*c', 30000, 'a'), printf('%.*c', 900, 'b'))"),
             request(engine, SLOW), request(engine, "SELECT 1 AS ok")]
    results = engine.run_batch(items)
    assert_invalid(results[0], "query", "too big")
    assert rows_of(results[1]) == [{"order_id": 1042}]
    assert_invalid(results[2], "query", "too much work")
    assert isinstance(results[3].error, DeadlineExceeded)
    assert rows_of(results[4]) == [{"ok": 1}]


# -- 2. a slow query holds one connection, not the others ---------------------------------

def test_batch_items_run_side_by_side(sql_store):
    # The slow query can only time out once a second thread read the clock, i.e.
    # once its batch neighbour started while it was still running.
    e = make_engine(sql_store)
    try:
        clock = GatedClock(lambda: len(clock.threads) >= 2)
        e.clock = clock
        results = e.run_batch([request(e, SLOW), request(e, BY_ID, params=[{"id": 1042}])])
        assert clock.opened_by == "gate"
        assert isinstance(results[0].error, DeadlineExceeded)
        assert rows_of(results[1]) == [{"order_id": 1042}]
    finally:
        e.unload()


def test_cheap_batch_finishes_while_a_slow_one_runs(sql_store):
    # The slow batch cannot end before the cheap one has returned (the clock stands
    # still until then), so the cheap one must not wait for its connection.
    e = make_engine(sql_store)
    try:
        cheap_done, slow_done = threading.Event(), threading.Event()
        e.clock = clock = GatedClock(cheap_done.is_set)
        slow_result = []

        def slow() -> None:
            slow_result.extend(e.run_batch([request(e, SLOW)]))
            slow_done.set()

        worker = threading.Thread(target=slow)
        worker.start()
        assert clock.read.wait(10)      # the slow query has begun
        cheap = e.run_batch([request(e, BY_ID, params=[{"id": 1042}])])[0]
        slow_was_running = not slow_done.is_set()
        cheap_done.set()
        worker.join(timeout=30)
        assert slow_was_running and clock.opened_by == "gate"
        assert rows_of(cheap) == [{"order_id": 1042}]
        assert isinstance(slow_result[0].error, DeadlineExceeded)
    finally:
        e.unload()


def test_concurrency_is_bounded_by_max_concurrency(sql_store):
    e = make_engine(sql_store, max_concurrency=2)
    try:
        threads: set[int] = set()

        def clock() -> float:
            threads.add(threading.get_ident())
            return time.monotonic()

        e.clock = clock
        results = e.run_batch([request(e, SLOW) for _ in range(4)] +
                              [request(e, BY_ID, params=[{"id": 1042}])])
        assert all(isinstance(r.error, DeadlineExceeded) for r in results[:4])
        assert rows_of(results[4]) == [{"order_id": 1042}]
        assert len(threads) == 2
    finally:
        e.unload()


# -- 3 and 4. bad inputs are INVALID_ARGUMENT naming their field ------------------------------

@pytest.mark.parametrize("query", [
    b"SELECT 1\0", b"SELECT '\0' AS a", b"SELECT 1 -- \0", b"SELECT 1 AS \xff\xfe", b"",
    b"   \n", b"SELECT '\xed\xa0\x80' AS a", b";",
    b"SELECT 1 FROM orders WHERE x = :a" + b"b" * 3000,
    "SELECT '\ud800' AS a",        # an in-process caller's str that UTF-8 cannot encode
])
def test_bad_query_text_names_query(engine, query):
    with pytest.raises(InvalidInput) as err:
        engine.prepare({"query": np.array([query], dtype=object)}, {})
    assert err.value.field == "query"


@pytest.mark.parametrize("params", [
    DEEP_PARAMS.encode(),                                        # over the length cap
    ("[" * 4000 + "]" * 4000).encode(),                          # under it, but deep
    ('{"id": ' + "[" * 2000 + "]" * 2000 + "}").encode(),
    b'{"id": {"nested": {"object": 1}}}', b'{"id": [1042]}', b"[]", b"null", b"1042", b'"1042"',
    b'{"id": 18446744073709551616}', b'{"id": 1' + b"0" * 5000 + b"}",
    b'{"id": NaN}', b'{"id": Infinity}', b'{"id": -Infinity}', b'{"id": 1e999}',
    b'{"id": "\\ud800"}', b"\xff\xfe", b'{"id": 1', b"{'id': 1}", b'{"id": "a\x00b"}',
])
def test_bad_params_name_params(engine, params):
    with pytest.raises(InvalidInput) as err:
        request(engine, BY_ID, params=[params])
    assert err.value.field == "params"


def test_odd_but_valid_params_are_fine(engine):
    rows = rows_of(run_one(engine, "SELECT :s AS s", params=[{"s": "[[[[[[[[[[{{{{{{{{{{"}]))
    assert rows == [{"s": "[[[[[[[[[[{{{{{{{{{{"}]
    assert rows_of(run_one(engine, "SELECT :s AS s", params=[b'{"s": "a\\u0000b"}'])) == [
        {"s": "a\x00b"}]
    assert not json_too_deep('{"s": "[[[[[[[[[[[[[[[[\\"]]]]"}', 2)
    assert json_too_deep("[[[1]]]", 2)



# -- over the wire ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def client(sql_store):
    config = mesh_config(sql_store, {"sql-executor": {"source": "store://sql-executor/1"}})
    async with running_server(config, ["sql-executor"]) as server:
        c = AsyncClient(f"127.0.0.1:{server.port}")
        yield c
        await c.close()


def sql_inputs(query: bytes, params: bytes = b"") -> dict:
    return {"query": np.array([query], dtype=object), "params": np.array([params], dtype=object)}


async def test_wire_bad_inputs_are_invalid_argument_and_fail_alone(client):
    good = sql_inputs(BY_ID.encode(), b'{"id": 1042}')
    bad = {
        "query": [sql_inputs(HUGE_PRINTF.encode()), sql_inputs(b"SELECT 1\0"),
                  sql_inputs(b"SELECT \xff"), sql_inputs(b"")],
        "params": [sql_inputs(BY_ID.encode(), DEEP_PARAMS.encode()),
                   sql_inputs(BY_ID.encode(), b'{"id": "\\ud800"}'),
                   sql_inputs(BY_ID.encode(), b'{"id": NaN}')],
    }
    calls = [(field, client.infer("sql-executor", inputs, timeout=60))
             for field, cases in bad.items() for inputs in cases]
    goods = [client.infer("sql-executor", good, timeout=60) for _ in range(3)]
    results = await asyncio.gather(*(c for _, c in calls), *goods, return_exceptions=True)
    for (field, _), r in zip(calls, results):
        assert isinstance(r, grpc.aio.AioRpcError), r
        assert r.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, r.details())
        assert r.details().startswith(f"{field}:"), r.details()
    assert "string or blob too big" in results[0].details()
    for r in results[len(calls):]:
        assert not isinstance(r, BaseException), r
        assert json.loads(r.outputs["rows"][0]) == [{"order_id": 1042}]


async def test_wire_slow_query_is_deadline_exceeded(client):
    slow, cheap = await asyncio.gather(
        client.infer("sql-executor", sql_inputs(SLOW.encode()), timeout=60),
        client.infer("sql-executor", sql_inputs(BY_ID.encode(), b'{"id": 1042}'), timeout=60),
        return_exceptions=True)
    assert isinstance(slow, grpc.aio.AioRpcError)
    assert slow.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert json.loads(cheap.outputs["rows"][0]) == [{"order_id": 1042}]
