"""``sql-sqlite``: read-only SQL over a SQLite database, served as a pipeline tool.

The queries come from callers that may be an LLM, so safety is layered and each
layer alone would stop a write:

1. ``prepare`` lexes the text (string literals, quoted identifiers and comments
   understood) and admits exactly one ``SELECT`` / ``WITH ... SELECT`` statement
   with named ``:parameters`` only; SQLite's own ``complete_statement`` cross-checks
   the statement boundaries the lexer found.
2. The connection is opened ``mode=ro`` with ``PRAGMA query_only=ON``.
3. An authorizer callback lets SQLite compile only reads, selects and functions.
4. Connection limits cap string/blob sizes and forbid ATTACH.

Each query runs under a progress-handler deadline and a row limit; a slow or
failing query fails only its own request, never its batch neighbours.
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmesh.errors import DeadlineExceeded, Internal, InvalidInput, MeshError
from model_server.engines.base import Engine, InferItem, ItemResult, decode_texts, register

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


def parse_params(raw: Any, names: tuple[str, ...], index: int) -> dict[str, Any]:
    """One query's ``params`` element: a JSON object of scalars covering every name."""
    where = f"element {index}"
    if raw is None:
        text = ""
    else:
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except UnicodeDecodeError:
            raise InvalidInput(PARAMS, f"{where} is not valid UTF-8") from None
    if not text.strip():
        values: Any = {}
    else:
        try:
            values = json.loads(text)
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


# -- engine -------------------------------------------------------------------------

@register
class SQLiteEngine(Engine):
    kind = "sql-sqlite"
    # VM instructions between deadline checks: frequent enough for ~ms precision,
    # rare enough that the Python callback costs little.
    PROGRESS_STEPS = 1000
    MAX_VALUE_BYTES = 1_000_000
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def load(self) -> None:
        self.row_limit = int(self.ctx.option("row_limit", 100))
        self.timeout_s = float(self.ctx.option("timeout_ms", 250)) / 1000.0
        self.max_query_chars = int(self.ctx.option("max_query_chars", 2000))
        if self.row_limit < 1 or self.timeout_s <= 0 or self.max_query_chars < 1:
            raise ValueError("row_limit, timeout_ms and max_query_chars must be positive")
        db_path = (self.ctx.model_dir / self.ctx.option("db", "orders.sqlite")).resolve()
        if not db_path.is_file():
            raise FileNotFoundError(f"database {db_path} not found")
        # The batcher's worker thread runs queries; load runs on another thread.
        self.conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True,
                                    check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA query_only = ON")  # before the authorizer forbids PRAGMA
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.MAX_VALUE_BYTES)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 4 * self.max_query_chars + 16)
        self.conn.set_authorizer(authorize)
        self._deadline = math.inf
        self._timed_out = False
        self.conn.set_progress_handler(self._on_progress, self.PROGRESS_STEPS)

    def _on_progress(self) -> int:
        # Non-zero aborts the running statement with OperationalError("interrupted").
        if self.clock() > self._deadline:
            self._timed_out = True
            return 1
        return 0

    def warmup(self) -> None:
        item = self.prepare({QUERY: np.array([b"SELECT 1 AS ok"], dtype=object)}, {})
        self.run_batch([item])

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
        params = [parse_params(raw, q.names, i) for i, (raw, q) in enumerate(zip(flat, queries))]
        # length stays 0: query text length says nothing about cost, so no bucketing.
        return InferItem(inputs=inputs, parameters=parameters, rows=rows,
                         prepared=Prepared(queries, params))

    def run_batch(self, items: list[InferItem]) -> list[ItemResult]:
        return [self._run_item(item) for item in items]

    def _run_item(self, item: InferItem) -> ItemResult:
        prepared: Prepared = item.prepared
        payloads, counts = [], []
        for i, (query, params) in enumerate(zip(prepared.queries, prepared.params)):
            try:
                names, rows = self._execute(query, params, i)
            except MeshError as exc:
                return ItemResult(error=exc)
            except Exception as exc:  # never let one request's surprise fail its batch
                return ItemResult(error=Internal(f"query element {i}: {type(exc).__name__}: {exc}"))
            payloads.append(rows_json(names, rows))
            counts.append(len(rows))
        return ItemResult(outputs={"rows": np.array(payloads, dtype=object),
                                   "row_count": np.array(counts, dtype=np.int64)})

    def _execute(self, query: CheckedQuery, params: dict[str, Any],
                 index: int) -> tuple[list[str], list[tuple]]:
        self._timed_out = False
        self._deadline = self.clock() + self.timeout_s
        cursor = None
        try:
            # Statements are stepped both by execute and by fetchmany: both run
            # under the deadline.
            cursor = self.conn.execute(query.sql, params)
            if cursor.description is None:
                raise InvalidInput(QUERY, f"element {index}: statement returns no rows")
            rows = cursor.fetchmany(self.row_limit + 1)
            # Rows beyond row_limit are dropped; fetching one extra only tells us that
            # the result was cut, which callers can see from row_count == row_limit.
            return column_names(cursor.description), rows[:self.row_limit]
        except (sqlite3.Error, sqlite3.Warning) as exc:
            if self._timed_out:
                raise DeadlineExceeded(
                    f"query element {index} {_preview(query.sql)!r} ran longer than timeout_ms="
                    f"{self.timeout_s * 1000:.0f} and was stopped", field=QUERY) from None
            if isinstance(exc, sqlite3.DatabaseError) and "not authorized" in str(exc):
                raise InvalidInput(QUERY, f"element {index}: not authorized: only reads of "
                                          "the database are allowed") from None
            raise InvalidInput(QUERY, f"element {index}: SQLite rejected it: {exc}") from None
        finally:
            self._deadline = math.inf
            if cursor is not None:
                cursor.close()

    def unload(self) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        if conn is not None:
            conn.close()


def _preview(sql: str, limit: int = 80) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
