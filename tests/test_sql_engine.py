"""sql-executor/1 served by the ``sql-sqlite`` engine: answers, and above all safety."""
from __future__ import annotations

import hashlib
import json
import sqlite3

import numpy as np
import pytest

from demo_store import _build_atomically, sql_orders
from demo_store.base import BuildContext
from cmesh.errors import DeadlineExceeded, InvalidInput
from cmesh.store import ModelStore
from model_server.engines.base import EngineContext, InferItem
from model_server.engines.sql_sqlite import (CheckedQuery, Prepared, Rejected, SQLiteEngine,
                                             check_query)

BY_ID = "SELECT * FROM orders WHERE order_id = :id"
# Counts to 10^9: minutes of work, so only the deadline can end it.
SLOW = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 1000000000) "
        "SELECT count(*) AS c FROM n")


@pytest.fixture(scope="session")
def sql_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("sql-store")
    ctx = BuildContext(store=store, progress=lambda line: None)
    for artifact in sql_orders.ARTIFACTS:
        _build_atomically(store, artifact, ctx)
    return store


def make_engine(store, **overrides) -> SQLiteEngine:
    version = ModelStore(str(store)).open("store://sql-executor/1")
    m = version.manifest
    engine = SQLiteEngine(EngineContext(
        model="sql-executor", variant="default", model_dir=version.local_dir, manifest=m,
        max_batch_size=m.batching.max_batch_size, options={**m.options, **overrides}))
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def engine(sql_store):
    e = make_engine(sql_store)
    yield e
    e.unload()


def db_path(store):
    return store / "sql-executor" / "1" / "orders.sqlite"


def request(engine, *queries, params=None) -> InferItem:
    inputs = {"query": np.array([q.encode() for q in queries], dtype=object)}
    if params is not None:
        inputs["params"] = np.array([p if isinstance(p, bytes) else json.dumps(p).encode()
                                     for p in params], dtype=object)
    return engine.prepare(inputs, {})


def run_one(engine, *queries, params=None):
    result = engine.run_batch([request(engine, *queries, params=params)])[0]
    assert result.error is None, result.error
    rows = [json.loads(r) for r in result.outputs["rows"]]
    return rows, result.outputs["row_count"].tolist()


# -- the built artifact ----------------------------------------------------------------

def test_manifest(sql_store):
    m = ModelStore(str(sql_store)).open("store://sql-executor/1").manifest
    assert m.engine == "sql-sqlite"
    assert [(t.name, t.datatype, t.shape, t.optional) for t in m.inputs] == [
        ("query", "BYTES", [-1], False), ("params", "BYTES", [-1], True)]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [
        ("rows", "BYTES", [-1]), ("row_count", "INT64", [-1])]
    assert (m.batching.max_batch_size, m.batching.max_queue_delay_ms) == (16, 1)
    assert m.options == {"db": "orders.sqlite", "row_limit": 100, "timeout_ms": 250,
                         "max_query_chars": 2000}


def test_database_schema(sql_store):
    conn = sqlite3.connect(f"{db_path(sql_store).as_uri()}?mode=ro", uri=True)
    try:
        cols = {r[1]: (r[2], r[5]) for r in conn.execute("PRAGMA table_info(orders)")}
        assert cols["order_id"] == ("INTEGER", 1) and cols["total_usd"][0] == "REAL"
        indexes = [r[1] for r in conn.execute("PRAGMA index_list(orders)")]
        assert "orders_customer_email" in indexes
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] >= 50
    finally:
        conn.close()


# -- answers ---------------------------------------------------------------------------

def test_order_1042(engine):
    rows, counts = run_one(engine, BY_ID, params=[{"id": 1042}])
    assert counts == [1]
    order = rows[0][0]
    assert order["order_id"] == 1042
    assert order["status"] == "shipped"
    assert order["tracking_number"] and order["carrier"]
    assert set(order) == set(sql_orders.COLUMNS)


def test_several_queries_in_one_request(engine):
    rows, counts = run_one(
        engine, BY_ID, "SELECT order_id FROM orders WHERE customer_email = :email ORDER BY order_id",
        "SELECT count(*) AS n FROM orders WHERE status = 'shipped'",
        params=[{"id": 999999}, {"email": "maya.patel@example.com"}, b""])
    assert counts[0] == 0 and rows[0] == []
    assert 1042 in [r["order_id"] for r in rows[1]] and counts[1] == len(rows[1])
    assert rows[2][0]["n"] > 0


def test_string_literals_and_comments_are_not_statement_breaks(engine):
    rows, _ = run_one(engine, "SELECT ';' AS a, 'it''s; fine' AS b -- trailing; comment\n;")
    assert rows == [[{"a": ";", "b": "it's; fine"}]]


def test_duplicate_column_names_are_kept(engine):
    rows, _ = run_one(engine, "SELECT a.order_id, b.order_id FROM orders a "
                              "JOIN orders b ON a.order_id = b.order_id WHERE a.order_id = 1042")
    assert rows == [[{"order_id": 1042, "order_id_2": 1042}]]


def test_row_limit(sql_store):
    e = make_engine(sql_store, row_limit=5)
    try:
        rows, counts = run_one(e, "SELECT order_id FROM orders")
        assert counts == [5] and len(rows[0]) == 5
    finally:
        e.unload()


# -- rejected queries ------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT 1; DROP TABLE orders",
    "SELECT 1; SELECT 2",
    "SELECT 1 /* ; */ ; DELETE FROM orders",
    "DROP TABLE orders",
    "INSERT INTO orders (order_id) VALUES (1)",
    "UPDATE orders SET status = 'cancelled'",
    "DELETE FROM orders",
    "REPLACE INTO orders (order_id) VALUES (1)",
    "CREATE TABLE x (a)",
    "PRAGMA table_info(orders)",
    "pragma query_only = OFF",
    "ATTACH DATABASE '/tmp/evil.db' AS evil",
    "VACUUM INTO '/tmp/copy.db'",
    "EXPLAIN SELECT 1",
    "BEGIN",
    "WITH x AS (SELECT 1) DELETE FROM orders",
    "WITH x AS (SELECT 1) INSERT INTO orders (order_id) SELECT 1",
    "SELECT * FROM orders WHERE order_id = ?",
    "SELECT * FROM orders WHERE order_id = ?1",
    "SELECT * FROM orders WHERE order_id = @id",
    "SELECT 'unterminated",
    "SELECT 1 /* unterminated",
    "   -- only a comment",
    "SELECT " + "1 + " * 600 + "1",      # over max_query_chars
])
def test_rejected_queries_name_the_query(engine, sql):
    with pytest.raises(InvalidInput) as err:
        request(engine, sql)
    assert err.value.field == "query"


def test_rejection_names_the_element(engine):
    with pytest.raises(InvalidInput) as err:
        request(engine, "SELECT 1", "DELETE FROM orders")
    assert err.value.field == "query" and "element 1" in err.value.message


@pytest.mark.parametrize("params", [
    b"not json", b"[1, 2]", b'"1042"', b"\xff\xfe",
    {"other": 1}, {"id": [1042]}, {"id": {"x": 1}}, {"id": 2**70},
])
def test_bad_params_name_params(engine, params):
    with pytest.raises(InvalidInput) as err:
        request(engine, BY_ID, params=[params])
    assert err.value.field == "params"


def test_missing_params_input_names_params(engine):
    with pytest.raises(InvalidInput) as err:
        request(engine, BY_ID)
    assert err.value.field == "params"


def test_execution_error_fails_only_its_item(engine):
    bad = request(engine, "SELECT no_such_column FROM orders")
    good = request(engine, BY_ID, params=[{"id": 1042}])
    results = engine.run_batch([bad, good])
    assert isinstance(results[0].error, InvalidInput) and results[0].error.field == "query"
    assert "no_such_column" in results[0].error.message
    assert results[1].error is None and results[1].outputs["row_count"].tolist() == [1]


# -- deadline --------------------------------------------------------------------------

def test_slow_query_times_out_alone(engine):
    slow = request(engine, SLOW)
    good = request(engine, BY_ID, params=[{"id": 1042}])
    results = engine.run_batch([good, slow, good])
    assert len(results) == 3
    assert isinstance(results[1].error, DeadlineExceeded)
    assert "timeout_ms=250" in results[1].error.message
    assert "WITH RECURSIVE" in results[1].error.message
    for r in (results[0], results[2]):
        assert r.error is None
        assert json.loads(r.outputs["rows"][0])[0]["order_id"] == 1042
    # The connection is healthy afterwards.
    assert run_one(engine, "SELECT 1 AS ok")[0] == [[{"ok": 1}]]


# -- defence in depth and the file itself ---------------------------------------------------

@pytest.mark.parametrize("sql", [
    "DELETE FROM orders", "DROP TABLE orders", "PRAGMA query_only = OFF",
    "ATTACH DATABASE ':memory:' AS m", "SELECT load_extension('x')",
])
def test_authorizer_stops_what_prepare_would_have(engine, sql):
    # Bypass the lexical checks: the authorizer alone must refuse these.
    forged = InferItem(inputs={}, parameters={}, rows=1,
                       prepared=Prepared([CheckedQuery(sql, ())], [{}]))
    result = engine.run_batch([forged])[0]
    assert isinstance(result.error, InvalidInput) and result.error.field == "query"
    assert run_one(engine, "SELECT count(*) AS n FROM orders")[0][0][0]["n"] == 60


def test_connection_is_read_only_without_the_authorizer(sql_store):
    e = make_engine(sql_store)
    try:
        e.conn.set_authorizer(None)
        with pytest.raises(sqlite3.OperationalError, match="readonly|query_only"):
            e.conn.execute("DELETE FROM orders")
        e.conn.execute("PRAGMA query_only = OFF")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            e.conn.execute("DELETE FROM orders")
    finally:
        e.unload()


def test_database_file_unchanged(sql_store):
    path = db_path(sql_store)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    e = make_engine(sql_store)
    try:
        for sql in ("DELETE FROM orders", "UPDATE orders SET status = 'x'", "DROP TABLE orders"):
            forged = InferItem(inputs={}, parameters={}, rows=1,
                               prepared=Prepared([CheckedQuery(sql, ())], [{}]))
            assert e.run_batch([forged])[0].error is not None
        run_one(e, "SELECT * FROM orders")
    finally:
        e.unload()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("orders")) == [
        "orders.sqlite"]   # no journal or WAL files appeared


# -- the pure checker ------------------------------------------------------------------

def test_check_query_keeps_one_statement_and_names():
    checked = check_query("  /* lead */ SELECT :a, :b, :a FROM t ;  -- tail", 2000)
    assert checked.sql == "SELECT :a, :b, :a FROM t"
    assert checked.names == ("a", "b")


@pytest.mark.parametrize("sql", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) SELECT x FROM c",
    'SELECT "weird;name" FROM t',
    "SELECT replace(item, 'a', 'b') FROM orders",
    "select 1;;",
])
def test_check_query_accepts(sql):
    check_query(sql, 2000)


def test_check_query_rejects_with_a_reason():
    with pytest.raises(Rejected, match="exactly one"):
        check_query("SELECT 1; SELECT 2", 2000)
