"""Resource limits of the ``sql-sqlite`` engine and the pure checks behind them.

A query's deadline is a progress handler, and SQLite calls it only at the bottom
of VM loops, never inside one function call. The deadline therefore holds only if
every single step is short, which is what these limits are for:

* SQLite's own limits cap every value (``value_bytes``: strings, blobs and rows),
  the statement and its parse tree, function arguments and the LIKE/GLOB pattern.
  Most built-ins are linear in their inputs, so a value cap bounds them, and
  ``zeroblob``/``randomblob``/``replace`` fail fast with "string or blob too big".
* Built-ins whose cost a value cap does not bound are replaced by ``GUARDS``: a
  check before the call, a deadline check, then the built-in itself on a side
  connection. ``printf``/``format`` repeat ``%c`` once per unit of precision even
  after the output hit the length limit (SQLite 3.40: ``printf('%.*c', 1e9, 'x')``
  runs for seconds and returns NULL); two-argument ``trim`` is O(len x * len y)
  with a slow inner loop (seconds at 64 KiB); ``instr`` and ``replace`` are
  quadratic too, but with a memcmp inner loop (~10 ms at the default cap), so they
  only get the deadline check, which bounds a row that calls them many times.
* LIKE and GLOB stay native: they are hot in WHERE clauses and a Python wrapper
  would make every scanned row pay for it. One call costs about value x pattern
  length (~8 ms at the defaults), so a statement may hold only so many of them
  (``pattern_calls``, counted by the authorizer at compile time).
"""
from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    value_bytes: int = 32_768         # any string, blob or row SQLite builds
    sql_bytes: int = 8_016            # statement text (UTF-8); the engine derives it
    expr_depth: int = 100             # parse tree depth (parser recursion)
    compound_select: int = 20         # UNION / EXCEPT terms
    function_args: int = 32           # json_object over a dozen columns still fits
    columns: int = 128                # result columns, GROUP BY / ORDER BY terms
    variables: int = 100              # highest parameter index
    like_pattern: int = 64            # LIKE/GLOB pattern bytes
    pattern_calls: int = 16           # LIKE/GLOB authorizations per statement; SQLite
                                      # compiles a WHERE clause again once a :parameter
                                      # pattern is bound, so those count twice
    trim_work: int = 2_000_000        # len(x) * len(y) of one two-argument trim (~10 ms)

    def sqlite_limits(self) -> dict[int, int]:
        return {
            sqlite3.SQLITE_LIMIT_LENGTH: self.value_bytes,
            sqlite3.SQLITE_LIMIT_SQL_LENGTH: self.sql_bytes,
            sqlite3.SQLITE_LIMIT_EXPR_DEPTH: self.expr_depth,
            sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: self.compound_select,
            sqlite3.SQLITE_LIMIT_FUNCTION_ARG: self.function_args,
            sqlite3.SQLITE_LIMIT_COLUMN: self.columns,
            sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: self.variables,
            sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: self.like_pattern,
            sqlite3.SQLITE_LIMIT_ATTACHED: 0,
            sqlite3.SQLITE_LIMIT_WORKER_THREADS: 0,   # no sorter threads behind our back
        }


def apply_limits(conn: sqlite3.Connection, limits: Limits) -> None:
    for category, value in limits.sqlite_limits().items():
        conn.setlimit(category, value)


# -- printf (pure) ----------------------------------------------------------------------

_CONVERSIONS = frozenset("dsgzqQwcouxXifeEG%pnr")   # SQLite 3.40; others end the format
# Conversions whose precision is a minimum output length (repeats for %c, digits
# otherwise); for %s, %q, %g ... it is a maximum and costs nothing.
_PRECISION_WRITES = frozenset("cdiuxXoprfeE")
_NUMERIC_PREFIX = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LEADING_DIGITS = re.compile(r"\s*[+-]?(\d*)")
_INT64_MAX = 2**63 - 1


def sqlite_int(value: Any) -> int:
    """The magnitude of the integer SQLite reads from a printf argument; where its
    text rules are unclear (``'1e9'``), the larger reading, since only the size
    matters and it is checked against a limit."""
    if value is None:
        return 0
    if isinstance(value, int):
        return min(abs(value), _INT64_MAX)
    if isinstance(value, float):
        return 0 if math.isnan(value) else int(min(abs(value), float(_INT64_MAX)))
    text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    match = _NUMERIC_PREFIX.match(text)
    if match is None:
        return 0
    digits = _LEADING_DIGITS.match(match.group()).group(1)
    as_int = _INT64_MAX if len(digits) > 19 else int(digits or 0)   # '99e-5' reads 99
    return int(min(max(as_int, abs(float(match.group()))), _INT64_MAX))  # '1e9' reads 1e9


def _digits(fmt: str, i: int) -> tuple[int, int]:
    j = i
    while j < len(fmt) and fmt[j] in "0123456789":
        j += 1
    return (int(fmt[i:j]) if j > i else 0), j


def printf_size(fmt: str, args: Sequence[Any]) -> int:
    """The characters that SQLite's ``printf(fmt, *args)`` must write at least: per
    conversion its width, or its precision where that is a minimum. Parses the way
    SQLite 3.40 does (flags, width, ``.precision``, ``*`` taking the next argument,
    ``l``), and stops where SQLite stops, at an unknown conversion."""
    total, used, i, n = 0, 0, 0, len(fmt)

    def star() -> int:
        nonlocal used
        used += 1
        return sqlite_int(args[used - 1]) if used <= len(args) else 0

    while (i := fmt.find("%", i)) >= 0:
        i += 1
        while i < n and fmt[i] in "-+ #!0,":
            i += 1
        width = precision = 0
        if i < n and fmt[i] == "*":
            width, i = star(), i + 1
        else:
            width, i = _digits(fmt, i)
        if i < n and fmt[i] == ".":
            if i + 1 < n and fmt[i + 1] == "*":
                precision, i = star(), i + 2
            else:
                precision, i = _digits(fmt, i + 1)
        while i < n and fmt[i] == "l":
            i += 1
        if i >= n or fmt[i] not in _CONVERSIONS:
            return total
        conversion = fmt[i]
        i += 1
        if conversion not in "%n":
            used += 1                   # the value it formats
        total += max(width, precision if conversion in _PRECISION_WRITES else 0)
    return total


# -- guards (pure) ------------------------------------------------------------------------

def _length(value: Any) -> int:
    return 0 if value is None else len(value) if isinstance(value, (str, bytes)) else len(str(value))


def _check_printf(name: str, args: tuple, limits: Limits) -> str | None:
    if not args or args[0] is None:
        return None
    fmt = args[0].decode("utf-8", "replace") if isinstance(args[0], bytes) else str(args[0])
    size = printf_size(fmt, args[1:])
    if size > limits.value_bytes:
        return (f"string or blob too big: {name}() asks for {size} characters, "
                f"values are limited to {limits.value_bytes} bytes")
    return None


def _check_trim(name: str, args: tuple, limits: Limits) -> str | None:
    work = _length(args[0]) * _length(args[1])
    if work > limits.trim_work:
        return (f"{name}() of {_length(args[0])} characters by a set of {_length(args[1])} is "
                f"too much work for one call (their product is limited to {limits.trim_work})")
    return None


@dataclass(frozen=True)
class Guard:
    name: str
    nargs: int                    # -1: any number, as SQLite's printf
    check: Callable[[str, tuple, Limits], str | None] | None   # why a call is refused

    def sql(self, nargs: int) -> str:
        """The built-in itself, for the side connection that has no guards."""
        return f"SELECT {self.name}({', '.join('?' * nargs)})"


GUARDS = (
    Guard("printf", -1, _check_printf), Guard("format", -1, _check_printf),
    Guard("trim", 2, _check_trim), Guard("ltrim", 2, _check_trim), Guard("rtrim", 2, _check_trim),
    Guard("instr", 2, None), Guard("replace", 3, None),
)
PATTERN_FUNCTIONS = frozenset({"like", "glob"})


# -- params nesting (pure) ------------------------------------------------------------------

def json_too_deep(text: str, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit``; linear, so deep
    input is refused before a recursive parser sees it."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False
