"""``sql-sqlite``: read-only SQL over a SQLite database, served as a pipeline tool.

The queries come from callers that may be an LLM, so safety is layered and each
layer alone would stop a write:

1. ``prepare`` lexes the text (string literals, quoted identifiers and comments
   understood) and admits exactly one ``SELECT`` / ``WITH ... SELECT`` statement
   with named ``:parameters`` only; SQLite's own ``complete_statement`` cross-checks
   the statement boundaries the lexer found.
2. The connection is opened ``mode=ro`` with ``PRAGMA query_only=ON``.
3. An authorizer callback lets SQLite compile only reads, selects and functions.
4. Connection limits (``sql_limits``) cap values, statements and the built-ins
   whose cost sizes alone do not bound, and forbid ATTACH.

Each query runs under its own progress-handler deadline, a row limit and a result
size limit, on one of ``max_concurrency`` connections: the items of a batch run
side by side, so a slow query holds one connection and the others go on. A slow
or failing query fails only its own request, never its batch neighbours.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import queue
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmesh.errors import DeadlineExceeded, Internal, InvalidInput, MeshError
from model_server.engines.base import Engine, InferItem, ItemResult, decode_texts, register
from model_server.engines.sql_limits import (GUARDS, PATTERN_FUNCTIONS, Guard, Limits, apply_limits,
                                             json_too_deep)

QUERY = "query"
PARAMS = "params"

# -- lexing (pure) ------------------------------------------------------------------


class Rejected(ValueError):
    """Why a query text is refused; ``prepare`` turns it into InvalidInput(query)."""


@dataclass(frozen=True)
class Token:
    kind: str      # word, number, string, ident, param, op, semi
    text: str
    start: int
    end: int
    depth: int     # parenthesis depth where the token starts


def _is_word_start(ch: str) -> bool:
    return ch.isalpha() or ch == "_" or ord(ch) > 127


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$" or ord(ch) > 127


def _scan_quoted(sql: str, i: int, close: str, what: str) -> int:
    """End index (exclusive) of a quoted run starting at ``sql[i]``; a doubled closing
    quote is an escaped quote, as in SQL."""
    j = i + 1
    while True:
        k = sql.find(close, j)
        if k < 0:
            raise Rejected(f"unterminated {what} starting at character {i}")
        if close != "]" and sql.startswith(close * 2, k):
            j = k + 2
            continue
        return k + 1


def tokenize(sql: str) -> list[Token]:
    """SQLite-flavoured tokens, comments and whitespace dropped. Unterminated strings,
    identifiers and comments are Rejected (SQLite would read them differently)."""
    tokens: list[Token] = []
    depth, i, n = 0, 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i):
            nl = sql.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise Rejected(f"unterminated comment starting at character {i}")
            i = end + 2
        elif ch == "'":
            end = _scan_quoted(sql, i, "'", "string literal")
            tokens.append(Token("string", sql[i:end], i, end, depth))
            i = end
        elif ch in "\"`[":
            end = _scan_quoted(sql, i, {"\"": "\"", "`": "`", "[": "]"}[ch], "quoted identifier")
            tokens.append(Token("ident", sql[i:end], i, end, depth))
            i = end
        elif ch in "?:@$" and (ch == "?" or (i + 1 < n and _is_word_char(sql[i + 1]))):
            j = i + 1
            while j < n and _is_word_char(sql[j]) and not (ch == "?" and not sql[j].isdigit()):
                j += 1
            tokens.append(Token("param", sql[i:j], i, j, depth))
            i = j
        elif _is_word_start(ch):
            j = i + 1
            while j < n and _is_word_char(sql[j]):
                j += 1
            tokens.append(Token("word", sql[i:j], i, j, depth))
            i = j
        elif ch.isdigit() or (ch == "." and i + 1 < n and sql[i + 1].isdigit()):
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "._"):
                j += 1
            tokens.append(Token("number", sql[i:j], i, j, depth))
            i = j
        elif ch == ";":
            tokens.append(Token("semi", ch, i, i + 1, depth))
            i += 1
        else:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(depth - 1, 0)
            tokens.append(Token("op", ch, i, i + 1, depth))
            i += 1
    return tokens


def split_statements(tokens: list[Token]) -> list[list[Token]]:
    """Tokens grouped by ``;``; empty statements (``;;``, trailing ``;``) dropped."""
    statements, current = [], []
    for tok in tokens:
        if tok.kind == "semi":
            if current:
                statements.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        statements.append(current)
    return statements


# Main verbs a WITH clause can lead into; only SELECT is a read.
_WITH_TARGETS = {"SELECT", "VALUES", "INSERT", "UPDATE", "DELETE", "REPLACE"}


@dataclass(frozen=True)
class CheckedQuery:
    sql: str                    # the single statement, without comments around it or ``;``
    names: tuple[str, ...]      # named parameters it binds, without the ``:``


def check_query(sql: str, max_chars: int) -> CheckedQuery:
    """Admit exactly one read-only SELECT with named parameters, else Rejected."""
    if len(sql) > max_chars:
        raise Rejected(f"{len(sql)} characters, limit {max_chars}")
    nul = sql.find("\0")
    if nul >= 0:   # SQLite's C API would end the text there; Python's refuses it outright
        raise Rejected(f"contains a NUL character at position {nul}")
    if not _encodable(sql):
        raise Rejected("is not valid Unicode (it holds a lone surrogate)")
    statements = split_statements(tokenize(sql))
    if not statements:
        raise Rejected("no SQL statement given")
    if len(statements) > 1:
        raise Rejected(f"{len(statements)} statements given; exactly one is allowed")
    stmt = statements[0]
    text = sql[stmt[0].start:stmt[-1].end]
    _cross_check_boundaries(text)
    verb = stmt[0].text.upper() if stmt[0].kind == "word" else stmt[0].text
    if verb == "WITH":
        main = next((t.text.upper() for t in stmt[1:]
                     if t.kind == "word" and t.depth == 0 and t.text.upper() in _WITH_TARGETS), "")
        if main != "SELECT":
            raise Rejected(f"WITH must lead into a SELECT, not {main or 'nothing'}")
    elif verb != "SELECT":
        raise Rejected(f"only read-only SELECT statements are allowed, not {verb}")
    names = []
    for tok in stmt:
        if tok.kind != "param":
            continue
        if not tok.text.startswith(":"):
            raise Rejected(f"parameter {tok.text!r} at character {tok.start}: "
                                      "only named parameters like :order_id are allowed")
        if tok.text[1:] not in names:
            names.append(tok.text[1:])
    return CheckedQuery(sql=text, names=tuple(names))


def _cross_check_boundaries(text: str) -> None:
    """Ask SQLite's own lexer whether the statement ends where ours says: it must be
    complete once terminated, and no ``;`` inside it may end a statement for SQLite."""
    if not sqlite3.complete_statement(text + ";"):
        raise Rejected("statement is incomplete")
    for i, ch in enumerate(text):
        if ch == ";" and sqlite3.complete_statement(text[:i + 1]):
            raise Rejected(f"statement ends at character {i}; "
                                      "exactly one statement is allowed")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Values are flat scalars, so any depth beyond this is a mistake; refusing it first
# keeps json's recursive parser away from adversarial nesting.
MAX_PARAMS_DEPTH = 8


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:   # before int() tries a 4300-digit conversion
        raise ValueError(f"integer {text[:24]}... does not fit a 64-bit integer")
    return int(text)


def parse_params(raw: Any, names: tuple[str, ...], index: int, max_chars: int) -> dict[str, Any]:
    """One query's ``params`` element: a JSON object of scalars covering every name.
    Linear in the element's size whatever it holds: nesting is refused by a scan
    before json's recursive parser sees it."""
    where = f"element {index}"
    if raw is None:
        text = ""
    else:
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except UnicodeDecodeError:
            raise InvalidInput(PARAMS, f"{where} is not valid UTF-8") from None
    if len(text) > max_chars:
        raise InvalidInput(PARAMS, f"{where} has {len(text)} characters, limit {max_chars}")
    if not text.strip():
        values: Any = {}
    else:
        if json_too_deep(text, MAX_PARAMS_DEPTH):
            raise InvalidInput(PARAMS, f"{where} nests deeper than {MAX_PARAMS_DEPTH} levels; "
                                       "it must be a flat JSON object of named parameters")
        try:
            values = json.loads(text, parse_int=_parse_int)
        except ValueError as exc:
            raise InvalidInput(PARAMS, f"{where} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise InvalidInput(PARAMS, f"{where} must be a JSON object of named parameters, "
                                   f"got {type(values).__name__}")
    for key, value in values.items():
        if isinstance(value, bool):
            values[key] = int(value)  # SQLite has no boolean type
        elif isinstance(value, int) and not -2**63 <= value < 2**63:
            raise InvalidInput(PARAMS, f"{where}: {key!r} does not fit a 64-bit integer")
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(PARAMS, f"{where}: {key!r} must be a finite number")
        elif isinstance(value, str) and not _encodable(value):
            raise InvalidInput(PARAMS, f"{where}: {key!r} is not valid Unicode "
                                       "(it holds a lone surrogate escape)")
        elif value is not None and not isinstance(value, (str, int, float)):
            raise InvalidInput(PARAMS, f"{where}: {key!r} must be a string, number, boolean "
                                       f"or null, got {type(value).__name__}")
    missing = [n for n in names if n not in values]
    if missing:
        raise InvalidInput(PARAMS, f"{where} lacks named parameter(s) {missing}")
    return values


# -- results (pure) -------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()  # BLOBs: JSON has no bytes type
    if isinstance(value, float) and not math.isfinite(value):
        return None         # JSON has no inf/NaN
    return value


def column_names(description: tuple) -> list[str]:
    """Cursor column names, made unique (joins often repeat ``id``) so no value is lost."""
    names, seen = [], {}
    for col in description:
        name = col[0]
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        names.append(name)
    return names


def row_size(row: tuple) -> int:
    """About the JSON bytes a row adds; enough to cap a result before it is built."""
    return sum(2 * len(v) if isinstance(v, bytes) else len(v) if isinstance(v, str) else 24
               for v in row)


def rows_json(names: list[str], rows: list[tuple]) -> bytes:
    objects = [{n: _json_value(v) for n, v in zip(names, row)} for row in rows]
    return json.dumps(objects, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# -- authorizer (pure) ----------------------------------------------------------------

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    # WITH RECURSIVE compiles to this action; it reads nothing new.
                    sqlite3.SQLITE_RECURSIVE}
_DENIED_FUNCTIONS = {"load_extension"}


def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None,
              trigger: str | None) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


@dataclass
class Prepared:
    queries: list[CheckedQuery]
    params: list[dict[str, Any]]


# -- connections ----------------------------------------------------------------------

class _Stop(Exception):
    """Raised inside a guarded function to abort the statement; the slot says why."""


class Slot:
    """One read-only connection and the state of the query it runs: its deadline and,
    once SQLite stops it, why. A slot runs one query at a time; pool threads take
    turns with it, so its connections are not tied to one thread."""

    def __init__(self, db_uri: str, limits: Limits, now: Callable[[], float],
                 progress_steps: int) -> None:
        self.limits, self.now = limits, now
        self.deadline = math.inf
        self.timed_out = False
        self.refusal: str | None = None
        self.pattern_calls = 0
        self.conn = sqlite3.connect(db_uri, uri=True, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA query_only = ON")  # before the authorizer forbids PRAGMA
        apply_limits(self.conn, limits)
        # Guarded built-ins run for real here, once their guard let them: no tables,
        # the same limits, and no guards of its own.
        self.side = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        apply_limits(self.side, limits)
        for guard in GUARDS:
            self.conn.create_function(guard.name, guard.nargs, self._guarded(guard),
                                      deterministic=True)
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._on_progress, progress_steps)

    def begin(self, timeout_s: float) -> None:
        self.deadline = self.now() + timeout_s
        self.timed_out, self.refusal, self.pattern_calls = False, None, 0

    def end(self) -> None:
        self.deadline = math.inf

    def _on_progress(self) -> int:
        # Non-zero aborts the running statement with OperationalError("interrupted").
        if self.now() > self.deadline:
            self.timed_out = True
            return 1
        return 0

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                   trigger: str | None) -> int:
        verdict = authorize(action, arg1, arg2, db, trigger)
        if (verdict == sqlite3.SQLITE_OK and action == sqlite3.SQLITE_FUNCTION
                and (arg2 or "").lower() in PATTERN_FUNCTIONS):
            # Runs at compile time, so a cached statement passed before.
            self.pattern_calls += 1
            if self.pattern_calls > self.limits.pattern_calls:
                self.refusal = (f"too many LIKE/GLOB comparisons in one statement (at most "
                                f"{self.limits.pattern_calls}, or "
                                f"{self.limits.pattern_calls // 2} with :parameter patterns "
                                "in a WHERE clause)")
                return sqlite3.SQLITE_DENY
        return verdict

    def _guarded(self, guard: Guard) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            # Also a deadline check between calls: a row may call these many times.
            if self.now() > self.deadline:
                self.timed_out = True
                raise _Stop
            self.refusal = guard.check(guard.name, args, self.limits) if guard.check else None
            if self.refusal:
                raise _Stop
            try:
                return self.side.execute(guard.sql(len(args)), args).fetchone()[0]
            except sqlite3.Error as exc:    # e.g. "string or blob too big" from the built-in
                self.refusal = f"{guard.name}(): {exc}"
                raise _Stop from None
        return call

    def close(self) -> None:
        self.conn.close()
        self.side.close()


# -- engine -------------------------------------------------------------------------

@register
class SQLiteEngine(Engine):
    kind = "sql-sqlite"
    # VM instructions between deadline checks: frequent enough for ~ms precision,
    # rare enough that the Python callback costs little.
    PROGRESS_STEPS = 1000
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def load(self) -> None:
        option = self.ctx.option
        self.row_limit = int(option("row_limit", 100))
        self.timeout_s = float(option("timeout_ms", 250)) / 1000.0
        self.max_query_chars = int(option("max_query_chars", 2000))
        self.max_params_chars = int(option("max_params_chars", 10_000))
        self.max_result_bytes = int(option("max_result_bytes", 1_000_000))
        self.max_concurrency = int(option("max_concurrency", 4))
        self.limits = Limits(value_bytes=int(option("max_value_bytes", Limits.value_bytes)),
                             sql_bytes=4 * self.max_query_chars + 16)   # UTF-8 bytes
        sizes = (self.row_limit, self.max_query_chars, self.max_params_chars,
                 self.max_result_bytes, self.max_concurrency, self.limits.value_bytes)
        if min(sizes) < 1 or self.timeout_s <= 0:
            raise ValueError("row_limit, timeout_ms, max_query_chars, max_params_chars, "
                             "max_result_bytes, max_concurrency and max_value_bytes must be positive")
        db_path = (self.ctx.model_dir / self.ctx.option("db", "orders.sqlite")).resolve()
        if not db_path.is_file():
            raise FileNotFoundError(f"database {db_path} not found")
        uri = f"{db_path.as_uri()}?mode=ro"
        self._slots = [Slot(uri, self.limits, lambda: self.clock(), self.PROGRESS_STEPS)
                       for _ in range(self.max_concurrency)]
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        # As many threads as connections: a task never waits for a free slot.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix=f"sql-{self.ctx.model}")
        # Batches are independent too: the batcher may run this many at once, so
        # a slow query holds one slot, never the batches formed behind it.
        self.concurrent_batches = self.max_concurrency

    @property
    def conn(self) -> sqlite3.Connection:
        """The first connection of the pool; all are set up alike."""
        return self._slots[0].conn

    def warmup(self) -> None:
        item = self.prepare({QUERY: np.array([b"SELECT printf('%d', 1) AS ok"], dtype=object)}, {})
        for slot in self._slots:   # each connection compiles its guards' side statements
            result = self._run_queries(slot, item.prepared)
            if result.error is not None:
                raise result.error

    def prepare(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> InferItem:
        rows = self.check_inputs(inputs)
        texts = decode_texts(QUERY, inputs[QUERY], max_chars=self.max_query_chars)
        queries = []
        for i, text in enumerate(texts):
            try:
                queries.append(check_query(text, self.max_query_chars))
            except Rejected as exc:
                raise InvalidInput(QUERY, f"element {i}: {exc}") from None
        raw_params = inputs.get(PARAMS)
        flat = raw_params.reshape(-1) if raw_params is not None else [None] * rows
        params = [parse_params(raw, q.names, i, self.max_params_chars)
                  for i, (raw, q) in enumerate(zip(flat, queries))]
        # length stays 0: query text length says nothing about cost, so no bucketing.
        return InferItem(inputs=inputs, parameters=parameters, rows=rows,
                         prepared=Prepared(queries, params))

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        # One task per item, each on its own connection: a slow item holds one slot
        # while its neighbours finish on the others. Safe to call from several threads.
        futures = [self._pool.submit(self._run_item, item) for item in items]
        return [f.result() for f in futures]

    def _run_item(self, item: InferItem) -> ItemResult:
        slot = self._free.get()
        try:
            return self._run_queries(slot, item.prepared)
        finally:
            self._free.put(slot)

    def _run_queries(self, slot: Slot, prepared: Prepared) -> ItemResult:
        payloads, counts = [], []
        for i, (query, params) in enumerate(zip(prepared.queries, prepared.params)):
            try:
                names, rows = self._execute(slot, query, params, i)
            except MeshError as exc:
                return ItemResult(error=exc)
            except Exception as exc:  # never let one request's surprise fail its batch
                return ItemResult(error=Internal(f"query element {i}: {type(exc).__name__}: {exc}"))
            payloads.append(rows_json(names, rows))
            counts.append(len(rows))
        return ItemResult(outputs={"rows": np.array(payloads, dtype=object),
                                   "row_count": np.array(counts, dtype=np.int64)})

    def _execute(self, slot: Slot, query: CheckedQuery, params: dict[str, Any],
                 index: int) -> tuple[list[str], list[tuple]]:
        slot.begin(self.timeout_s)
        cursor = None
        try:
            # Statements are stepped both by execute and by fetchone: both run
            # under the deadline.
            cursor = slot.conn.execute(query.sql, params)
            if cursor.description is None:
                raise InvalidInput(QUERY, f"element {index}: statement returns no rows")
            # Rows beyond row_limit are never stepped to; callers see the cut from
            # row_count == row_limit. The size cap stops a result before it is built.
            rows, size = [], 0
            while len(rows) < self.row_limit and (row := cursor.fetchone()) is not None:
                size += row_size(row)
                if size > self.max_result_bytes:
                    raise InvalidInput(QUERY, f"element {index}: result is larger than "
                                              f"max_result_bytes={self.max_result_bytes}; "
                                              "select fewer rows or columns")
                rows.append(row)
            return column_names(cursor.description), rows
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if slot.timed_out:
                raise DeadlineExceeded(
                    f"query element {index} {_preview(query.sql)!r} ran longer than timeout_ms="
                    f"{self.timeout_s * 1000:.0f} and was stopped", field=QUERY) from None
            if slot.refusal:
                raise InvalidInput(QUERY, f"element {index}: {slot.refusal}") from None
            if isinstance(exc, sqlite3.DatabaseError) and "not authorized" in str(exc):
                raise InvalidInput(QUERY, f"element {index}: not authorized: only reads of "
                                          "the database are allowed") from None
            hint = (f" (values are limited to {self.limits.value_bytes} bytes)"
                    if "too big" in str(exc) else "")
            raise InvalidInput(QUERY, f"element {index}: SQLite rejected it: {exc}{hint}") from None
        finally:
            slot.end()
            if cursor is not None:
                cursor.close()

    def unload(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for slot in getattr(self, "_slots", []):
            slot.close()
        self._slots = []


def _preview(sql: str, limit: int = 80) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
