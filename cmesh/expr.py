"""Pipeline expressions: the small, safe language of a node's ``input``, ``when``
and ``params`` strings (DESIGN.md §3).

User text is never handed to Python's eval/exec/compile: a tokenizer and a
recursive-descent parser build an immutable AST, and ``evaluate`` walks it. Only
the functions in ``FUNCTIONS`` can be called, names starting with ``_`` are
rejected, and attributes are read from mappings (``.get``) or as plain data
attributes, so nothing reaches Python internals.

Grammar (precedence from loosest to tightest, as in Python)::

    expr     := or
    or       := and ('or' and)*
    and      := not ('and' not)*
    not      := 'not' not | compare
    compare  := sum (('=='|'!='|'<'|'<='|'>'|'>='|'in'|'not' 'in') sum)*   # chains like Python
    sum      := unary (('+'|'-') unary)*
    unary    := '-' unary | postfix
    postfix  := primary ('.' NAME | '[' expr ']')*
    primary  := NUMBER | STRING | FSTRING | true | false | null | True | False | None
              | NAME '(' [expr (',' expr)* [',']] ')'        # built-in functions only
              | NAME | '(' expr ')' | '[' [expr (',' expr)* [',']] ']'
              | '{' [STRING ':' expr (',' STRING ':' expr)* [',']] '}'

Strings take '...' or "..." with escapes \\n \\t \\r \\\\ \\' \\" (any other
backslash is kept, so regexes like '\\d+' read naturally); an ``f`` prefix embeds
``{expr}`` and ``{{``/``}}`` are literal braces. Positions in errors are 0-based
character offsets into the expression.

Evaluation takes ``env``: root name -> value (a mapping or an object with data
attributes). A node that was skipped or failed is present as None, and reading
through None yields None (``default(orders.rows, 'none')``), as do missing keys and
out-of-range indexes. ``node.output`` on a node's outputs mapping that has no
output named ``output`` is its first output. Numpy scalars and UTF-8 bytes read
out of values become Python numbers and str; arrays are truthy when non-empty.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cmesh.expr_values import (FUNCTIONS, EvalError, arithmetic, attribute, call, compare,
                               compile_pattern, item, negate, plain, to_str, truthy)

__all__ = ["Expr", "ExprError", "FUNCTIONS", "evaluate", "parse", "truthy"]

MAX_SOURCE = 20_000  # characters of one expression (a prompt template fits)
MAX_NESTING = 32  # brackets, calls, f-string fields and unary operators inside each other
MAX_TREE_DEPTH = 100  # keeps evaluation's recursion far below Python's limit
MAX_NODES = 2_000


class ExprError(ValueError):
    """A bad expression (parse) or a failed evaluation; ``position`` is a 0-based
    offset into the expression; ``expression`` is set for evaluation errors."""

    def __init__(self, message: str, position: int | None = None, expression: str | None = None) -> None:
        self.message = message
        self.position = position
        self.expression = expression
        text = message if position is None else f"{message} at {position}"
        super().__init__(text if expression is None else f"{text} in {expression!r}")


from cmesh.expr_ast import (Attr, Binary, Call, Compare, Const, DictLit, FString, Index, ListLit, Node, Ref,
                             Unary, _children, _collect_refs)


@dataclass(frozen=True)
class Expr:
    """A parsed expression: its source text and AST."""

    source: str
    root: Node
    _refs: frozenset[tuple[str, ...]]

    def references(self) -> set[tuple[str, ...]]:
        """Dotted paths read, e.g. {('intent', 'label'), ('request', 'text')};
        an index ends a path (``retrieve.passages[0]`` -> ('retrieve', 'passages'))."""
        return set(self._refs)

    def roots(self) -> set[str]:
        """First names read, e.g. {'intent', 'request'}."""
        return {path[0] for path in self._refs}

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return evaluate(self, env)


# --- tokenizer ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # 'num', 'str', 'fstr', 'name', 'op', 'end'
    value: Any
    start: int
    end: int


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_OPS = ("==", "!=", "<=", ">=", "<", ">", "+", "-", "(", ")", "[", "]", "{", "}", ",", ".", ":")
_HINTS = {"=": "use '==' to compare", "&": "use 'and'", "|": "use 'or'", "!": "use 'not' or '!='",
          "*": "only '+' and '-' are supported", "/": "only '+' and '-' are supported"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_KEYWORDS = {"and", "or", "not", "in"}
_COMPARE_OPS = {"==", "!=", "<", "<=", ">", ">="}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of expression"
    if tok.kind in ("op", "name"):
        return repr(tok.value)
    return "number" if tok.kind == "num" else "string"


class _Parser:
    """Lexes lazily, one token ahead, so an f-string can parse its ``{fields}``
    with a nested parser over the same text and resume after the ``}``."""

    def __init__(self, text: str, pos: int = 0, nesting: int = 0) -> None:
        self.text = text
        self.nesting = nesting
        self.tok = self._lex(pos)

    # tokens

    def _lex(self, pos: int) -> _Token:
        text = self.text
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return _Token("end", None, pos, pos)
        c = text[pos]
        if c in "fF" and text[pos + 1:pos + 2] in ("'", '"'):
            parts, end = self._lex_string(pos, pos + 1, fmt=True)
            return _Token("fstr", tuple(parts), pos, end)
        if c in "'\"":
            parts, end = self._lex_string(pos, pos, fmt=False)
            return _Token("str", parts[0], pos, end)
        if m := _NUMBER.match(text, pos):
            raw = m.group()
            try:
                value = float(raw) if m.group(1) or m.group(2) else int(raw)
            except ValueError:  # more digits than int() accepts
                raise ExprError("number too long", pos) from None
            return _Token("num", value, pos, m.end())
        if m := _NAME.match(text, pos):
            if m.group().startswith("_"):
                raise ExprError(f"names starting with '_' are not allowed ({m.group()!r})", pos)
            return _Token("name", m.group(), pos, m.end())
        for op in _OPS:
            if text.startswith(op, pos):
                return _Token("op", op, pos, pos + len(op))
        hint = f" ({_HINTS[c]})" if c in _HINTS else ""
        raise ExprError(f"unexpected character {c!r}{hint}", pos)

    def _lex_string(self, start: int, quote_at: int, fmt: bool) -> tuple[list, int]:
        text, quote = self.text, self.text[quote_at]
        parts: list[str | Node] = []
        buf: list[str] = []
        i = quote_at + 1
        while True:
            if i >= len(text):
                raise ExprError("unterminated string", start)
            c = text[i]
            if c == quote:
                break
            if c == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                buf.append(_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
            elif fmt and c in "{}":
                if text.startswith(c * 2, i):
                    buf.append(c)
                    i += 2
                    continue
                if c == "}":
                    raise ExprError("single '}' in f-string (write '}}' for a brace)", i)
                if buf:
                    parts.append("".join(buf))
                    buf = []
                node, i = self._field(i + 1)
                parts.append(node)
            else:
                buf.append(c)
                i += 1
        if buf or not parts:
            parts.append("".join(buf))
        return parts, i + 1

    def _field(self, pos: int) -> tuple[Node, int]:
        if self.nesting >= MAX_NESTING:
            raise ExprError("expression nests too deeply", pos)
        sub = _Parser(self.text, pos, self.nesting + 1)
        if sub.tok.kind == "op" and sub.tok.value == "}":
            raise ExprError("empty {} in f-string (write '{{' for a brace)", pos - 1)
        node = sub.expr()
        if not (sub.tok.kind == "op" and sub.tok.value == "}"):
            hint = " (format specs are not supported)" if sub._at("op", ":") else ""
            raise ExprError(f"expected '}}' in f-string, found {_describe(sub.tok)}{hint}", sub.tok.start)
        return node, sub.tok.end

    def _advance(self) -> _Token:
        tok = self.tok
        self.tok = self._lex(tok.end)
        return tok

    def _at(self, kind: str, *values: str) -> bool:
        return self.tok.kind == kind and (not values or self.tok.value in values)

    def _unexpected(self) -> ExprError:
        return ExprError(f"unexpected {_describe(self.tok)}", self.tok.start)

    def _close(self, opener: _Token) -> None:
        closer = _CLOSERS[opener.value]
        if self._at("op", closer):
            self._advance()
        elif self._at("end"):
            raise ExprError(f"unclosed {opener.value!r}", opener.start)
        else:
            raise ExprError(f"expected {closer!r}, found {_describe(self.tok)}", self.tok.start)

    # grammar

    def parse(self) -> Node:
        node = self.expr()
        if self._at("op", "("):
            raise ExprError("unexpected '(' (only built-in functions can be called)", self.tok.start)
        if not self._at("end"):
            raise self._unexpected()
        return node

    def _nested(self, rule: Callable[[], Node]) -> Node:
        if self.nesting >= MAX_NESTING:
            raise ExprError("expression nests too deeply", self.tok.start)
        self.nesting += 1
        try:
            return rule()
        finally:
            self.nesting -= 1

    def expr(self) -> Node:
        return self._nested(self._or)

    def _or(self) -> Node:
        node = self._and()
        while self._at("name", "or"):
            pos = self._advance().start
            node = Binary("or", node, self._and(), pos)
        return node

    def _and(self) -> Node:
        node = self._not()
        while self._at("name", "and"):
            pos = self._advance().start
            node = Binary("and", node, self._not(), pos)
        return node

    def _not(self) -> Node:
        if self._at("name", "not"):
            pos = self._advance().start
            return Unary("not", self._nested(self._not), pos)
        return self._compare()

    def _compare(self) -> Node:
        left = self._sum()
        ops, rights, pos = [], [], self.tok.start
        while True:
            if self._at("op", *_COMPARE_OPS) or self._at("name", "in"):
                ops.append(self._advance().value)
            elif self._at("name", "not"):  # after an operand, only 'not in' can follow
                self._advance()
                if not self._at("name", "in"):
                    raise self._unexpected()
                self._advance()
                ops.append("not in")
            else:
                break
            rights.append(self._sum())
        return Compare(left, tuple(ops), tuple(rights), pos) if ops else left

    def _sum(self) -> Node:
        node = self._unary()
        while self._at("op", "+", "-"):
            tok = self._advance()
            node = Binary(tok.value, node, self._unary(), tok.start)
        return node

    def _unary(self) -> Node:
        if self._at("op", "-"):
            pos = self._advance().start
            return Unary("-", self._nested(self._unary), pos)
        return self._postfix()

    def _postfix(self) -> Node:
        node = self._primary()
        while True:
            if self._at("op", "."):
                pos = self._advance().start
                if not self._at("name"):  # keywords are fine as attribute names
                    raise ExprError(f"expected a name after '.', found {_describe(self.tok)}", self.tok.start)
                node = Attr(node, self._advance().value, pos)
            elif self._at("op", "["):
                opener = self._advance()
                index = self.expr()
                self._close(opener)
                node = Index(node, index, opener.start)
            else:
                return node

    def _primary(self) -> Node:
        tok = self.tok
        if tok.kind in ("num", "str"):
            self._advance()
            return Const(tok.value, tok.start)
        if tok.kind == "fstr":
            self._advance()
            if all(isinstance(p, str) for p in tok.value):
                return Const("".join(tok.value), tok.start)
            return FString(tok.value, tok.start)
        if tok.kind == "name":
            if tok.value in _CONSTANTS:
                self._advance()
                return Const(_CONSTANTS[tok.value], tok.start)
            if tok.value in _KEYWORDS:
                raise self._unexpected()
            self._advance()
            if self._at("op", "("):
                return self._call(tok)
            return Ref(tok.value, tok.start)
        if self._at("op", "("):
            opener = self._advance()
            node = self.expr()
            self._close(opener)
            return node
        if self._at("op", "["):
            opener = self._advance()
            return ListLit(tuple(self._items(opener, self.expr)), opener.start)
        if self._at("op", "{"):
            return self._dict()
        raise self._unexpected()

    def _items(self, opener: _Token, item: Callable[[], Any]) -> list:
        items = []
        while not self._at("op", _CLOSERS[opener.value]):
            items.append(item())
            if not self._at("op", ","):
                break
            self._advance()
        self._close(opener)
        return items

    def _call(self, name: _Token) -> Node:
        if name.value not in FUNCTIONS:
            raise ExprError(f"unknown function {name.value!r} (functions: {', '.join(sorted(FUNCTIONS))})",
                            name.start)
        opener = self._advance()
        args = tuple(self._items(opener, self.expr))
        low, high, _ = FUNCTIONS[name.value]
        if not low <= len(args) <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise ExprError(f"{name.value}() takes {want} argument{'s' if high > 1 else ''} "
                            f"({len(args)} given)", name.start)
        if name.value == "re_find" and isinstance(args[0], Const):
            try:  # a literal pattern is checked when the config loads, not per request
                compile_pattern(args[0].value)
            except EvalError as exc:
                raise ExprError(f"re_find(): {exc}", args[0].pos) from None
        return Call(name.value, args, name.start)

    def _dict(self) -> Node:
        opener = self._advance()
        keys: list[str] = []

        def entry() -> Node:
            if not self._at("str"):
                raise ExprError(f"dict keys must be strings, found {_describe(self.tok)}", self.tok.start)
            key = self._advance()
            if key.value in keys:
                raise ExprError(f"duplicate key {key.value!r}", key.start)
            keys.append(key.value)
            if not self._at("op", ":"):
                raise ExprError(f"expected ':', found {_describe(self.tok)}", self.tok.start)
            self._advance()
            return self.expr()

        values = self._items(opener, entry)
        return DictLit(tuple(keys), tuple(values), opener.start)


def _check_size(root: Node) -> None:
    # Iterative: a long 'a + a + ...' chain is deep, and this must not recurse.
    count, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_TREE_DEPTH:
            raise ExprError(f"expression is too deep (over {MAX_TREE_DEPTH} levels)", node.pos)
        if count > MAX_NODES:
            raise ExprError(f"expression is too large (over {MAX_NODES} parts)", node.pos)
        stack.extend((child, depth + 1) for child in _children(node))


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> Expr:
    """Parse an expression; raises ExprError with a 0-based position."""
    if not isinstance(text, str):
        raise TypeError(f"expression must be a str, not {type(text).__name__}")
    if len(text) > MAX_SOURCE:
        raise ExprError(f"expression longer than {MAX_SOURCE} characters")
    root = _Parser(text).parse()
    _check_size(root)
    refs: set[tuple[str, ...]] = set()
    _collect_refs(root, refs)
    return Expr(text, root, frozenset(refs))


# --- evaluation --------------------------------------------------------------------

def evaluate(expr: Expr | str, env: Mapping[str, Any]) -> Any:
    """Evaluate against ``env`` (root name -> value); errors name the expression."""
    if isinstance(expr, str):
        expr = parse(expr)
    try:
        return _eval(expr.root, env)
    except ExprError as exc:
        raise ExprError(exc.message, exc.position, expr.source) from None


def _at(pos: int, operation: Callable[..., Any], *args: Any) -> Any:
    try:
        return operation(*args)
    except EvalError as exc:
        raise ExprError(str(exc), pos) from None


def _eval(node: Node, env: Mapping[str, Any]) -> Any:
    match node:
        case Const(value=value):
            return value
        case Ref(name=name, pos=pos):
            if name not in env:
                raise ExprError(f"unknown name {name!r}", pos)
            return plain(env[name])
        case Attr(obj=obj, name=name, pos=pos):
            return _at(pos, attribute, _eval(obj, env), name, isinstance(obj, Ref))
        case Index(obj=obj, index=index, pos=pos):
            return _at(pos, item, _eval(obj, env), _eval(index, env))
        case Call(func=func, args=args, pos=pos):
            values = [_eval(a, env) for a in args]
            return _at(pos, call, func, values)
        case Unary(op="not", operand=operand):
            return not truthy(_eval(operand, env))
        case Unary(operand=operand, pos=pos):
            return _at(pos, negate, _eval(operand, env))
        case Binary(op="and", left=left, right=right):
            value = _eval(left, env)
            return _eval(right, env) if truthy(value) else value
        case Binary(op="or", left=left, right=right):
            value = _eval(left, env)
            return value if truthy(value) else _eval(right, env)
        case Binary(op=op, left=left, right=right, pos=pos):
            return _at(pos, arithmetic, op, _eval(left, env), _eval(right, env))
        case Compare(left=left_node, ops=ops, rights=rights, pos=pos):
            left = _eval(left_node, env)
            for op, right_node in zip(ops, rights):  # chained, like Python: a < b < c
                right = _eval(right_node, env)
                if not _at(pos, compare, op, left, right):
                    return False
                left = right
            return True
        case ListLit(items=items):
            return [_eval(i, env) for i in items]
        case DictLit(keys=keys, values=values):
            return {k: _eval(v, env) for k, v in zip(keys, values)}
        case FString(parts=parts):
            return "".join(p if isinstance(p, str) else to_str(_eval(p, env)) for p in parts)
    raise AssertionError(f"unknown node {node!r}")  # pragma: no cover


def __getattr__(name: str) -> Any:
    # The pipeline-level checks live in cmesh.pipeline_check, which imports this
    # module; they are reachable from here too, for callers that look here.
    if name in ("implicit_dependencies", "validate_pipeline"):
        from cmesh import pipeline_check

        return getattr(pipeline_check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
