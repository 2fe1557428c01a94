"""Values of pipeline expressions (cmesh.expr): operators and built-in functions.

Plain Python over plain values: the evaluator hands over what it computed, and an
EvalError raised here comes back to the user as an ExprError that names the
position and the expression. None (a skipped node, a missing value) passes through
reads and most functions, so templates degrade rather than fail.
"""
from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

try:
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_REGEX_TEXT = 10_000  # re_find and first_int look at no more of their text
MAX_PATTERN = 200


class EvalError(Exception):
    """An operation or function cannot use its values; cmesh.expr adds where."""


# --- values ------------------------------------------------------------------------

def plain(value: Any) -> Any:
    """Numpy scalars -> Python; UTF-8 bytes (BYTES tensor elements) -> str."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:  # binary data stays bytes
            return value
    return value


def type_name(value: Any) -> str:
    return "null" if value is None else "array" if isinstance(value, np.ndarray) else type(value).__name__


def truthy(value: Any) -> bool:
    """Truth of a value, as for ``when``: Python's, except arrays are true when non-empty."""
    if isinstance(value, np.ndarray):
        return value.size > 0
    return bool(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def to_str(value: Any) -> str:
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, np.ndarray):
        return str([plain(v) for v in value.tolist()]) if value.ndim == 1 else str(value.tolist())
    if isinstance(value, (list, tuple)):
        return str([plain(v) for v in value])
    return value if isinstance(value, str) else str(value)


def sequence(value: Any) -> list | None:
    """A list/tuple/1-d array as a list of plain values; None for anything else."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.reshape(-1)] if value.ndim else None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return None


# --- built-in functions ------------------------------------------------------------

def _need_str(value: Any, what: str = "text") -> str:
    if not isinstance(value, str):
        raise EvalError(f"{what} must be a string, not {type_name(value)}")
    return value


def _star_height(items: Any) -> int:
    height = 0
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            low, high, sub = av  # a fixed count ('a{3}') adds no ambiguity
            height = max(height, _star_height(sub) + (1 if high != low else 0))
        else:
            height = max([height] + [_star_height(s) for s in _subpatterns(av)])
    return height


def _subpatterns(av: Any) -> Iterator[Any]:
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):  # group, branch, lookaround: the shapes vary by opcode
        for part in av:
            yield from _subpatterns(part)


def compile_pattern(pattern: Any) -> re.Pattern:
    return _compile(_need_str(pattern, "pattern"))


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    if len(pattern) > MAX_PATTERN:
        raise EvalError(f"pattern longer than {MAX_PATTERN} characters")
    try:
        compiled = re.compile(pattern)
        # Repeats inside variable repeats ('(a+)+', '(\w+\s?)*') backtrack
        # exponentially; Python's re cannot be interrupted, so refuse them.
        if _star_height(_sre.parse(pattern)) > 1:
            raise EvalError("pattern nests repeats like '(a+)+', which can take exponential time")
    except re.error as exc:
        raise EvalError(f"bad pattern: {exc}") from None
    return compiled


def _re_find(pattern: Any, text: Any) -> str | None:
    compiled = compile_pattern(pattern)
    if text is None:
        return None
    match = compiled.search(_need_str(text)[:MAX_REGEX_TEXT])
    if match is None:
        return None
    return match.group(1) if compiled.groups else match.group(0)


_INT = re.compile(r"[0-9]+")


def _first_int(text: Any) -> int | None:
    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    match = _INT.search(_need_str(text)[:MAX_REGEX_TEXT])
    return int(match.group()) if match else None


def _join(items: Any, sep: Any = " ") -> str:
    if items is None:
        return ""
    values = sequence(items)
    if values is None:
        raise EvalError(f"expects a list, not {type_name(items)}")
    return _need_str(sep, "separator").join(to_str(v) for v in values)


def _case(convert: Callable[[str], str]) -> Callable[[Any], str | None]:
    return lambda s: None if s is None else convert(_need_str(s))


def _len(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise EvalError("a scalar array has no length")
        return len(value)
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value)
    raise EvalError(f"{type_name(value)} has no length")


def _number(convert: type) -> Callable[[Any], Any]:
    def run(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (str, int, float)):
            raise EvalError(f"cannot convert {type_name(value)}")
        return convert(value.strip() if isinstance(value, str) else value)
    return run


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    converted = plain(value)
    if converted is value:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError(f"{type_name(value)} is not JSON serializable")
    return converted


def _to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, np.ndarray):
        return value.size == 0
    return isinstance(value, (str, list, tuple, Mapping)) and len(value) == 0


def _first(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return value[:1] or None
    values = sequence(value)
    if values is None:
        raise EvalError(f"expects a list, not {type_name(value)}")
    return values[0] if values else None


def _truncate(value: Any, n: Any) -> Any:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise EvalError("length must be a non-negative integer")
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise EvalError(f"cannot truncate {type_name(value)}")
    return value[:n]


# name -> (fewest arguments, most arguments, implementation)
FUNCTIONS: dict[str, tuple[int, int, Callable[..., Any]]] = {
    "first_int": (1, 1, _first_int),
    "re_find": (2, 2, _re_find),
    "join": (1, 2, _join),
    "lower": (1, 1, _case(str.lower)),
    "upper": (1, 1, _case(str.upper)),
    "len": (1, 1, _len),
    "str": (1, 1, to_str),
    "int": (1, 1, _number(int)),
    "float": (1, 1, _number(float)),
    "json": (1, 1, _to_json),
    "default": (2, 2, lambda value, fallback: fallback if _empty(value) else value),
    "first": (1, 1, _first),
    "truncate": (2, 2, _truncate),
}


def call(func: str, args: list[Any]) -> Any:
    try:
        return FUNCTIONS[func][2](*args)
    except (EvalError, TypeError, ValueError, OverflowError) as exc:  # int('x'), int(1e400), ...
        raise EvalError(f"{func}(): {exc}") from None


# --- operators -----------------------------------------------------------------------

_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}
_NO_ATTRIBUTES = (str, bytes, int, float, bool, list, tuple, np.ndarray, np.generic)


def attribute(obj: Any, name: str, node_level: bool) -> Any:
    """``obj.name``; ``node_level``: obj is a root value (a node's outputs)."""
    if obj is None:  # a skipped or failed node, or a missing value further up
        return None
    if isinstance(obj, Mapping):
        if name in obj:
            return plain(obj[name])
        if name == "output" and node_level and obj:  # a node's first output
            return plain(next(iter(obj.values())))
        return None
    if isinstance(obj, _NO_ATTRIBUTES):
        raise EvalError(f"{type_name(obj)} has no attribute {name!r}")
    value = getattr(obj, name, None)
    if callable(value):  # methods and classes stay out of reach
        raise EvalError(f"attribute {name!r} is not a value")
    return plain(value)


def item(obj: Any, key: Any) -> Any:
    """``obj[key]``: None when either is None, the key is missing or out of range."""
    if obj is None or key is None:
        return None
    if isinstance(obj, Mapping):
        if not isinstance(key, (str, int, float)):
            raise EvalError(f"cannot look up a {type_name(key)} key")
        return plain(obj.get(key))
    if isinstance(obj, (str, list, tuple)) or (isinstance(obj, np.ndarray) and obj.ndim):
        if not isinstance(key, int) or isinstance(key, bool):
            raise EvalError(f"index must be an integer, not {type_name(key)}")
        return plain(obj[key]) if -len(obj) <= key < len(obj) else None
    raise EvalError(f"cannot index {type_name(obj)}")


def negate(value: Any) -> Any:
    if not is_number(value):
        raise EvalError(f"cannot negate {type_name(value)}")
    return -value


def arithmetic(op: str, left: Any, right: Any) -> Any:
    """``+`` on numbers, strings and lists; ``-`` on numbers."""
    if is_number(left) and is_number(right):
        return left + right if op == "+" else left - right
    if op == "+":
        if isinstance(left, str) and isinstance(right, str):
            return left + right
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            return list(left) + list(right)
    verb = "add" if op == "+" else "subtract"
    raise EvalError(f"cannot {verb} {type_name(left)} and {type_name(right)}")


def compare(op: str, left: Any, right: Any) -> bool:
    if op in ("in", "not in"):
        return _contains(right, left) == (op == "in")
    # An array comparison is elementwise, and its truth is ambiguous.
    if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
        raise EvalError("cannot compare an array; pick an element, e.g. x[0]")
    try:
        return bool(_COMPARE[op](left, right))
    except TypeError:
        raise EvalError(f"cannot compare {type_name(left)} {op} {type_name(right)}") from None


def _contains(container: Any, value: Any) -> bool:
    if container is None:  # nothing is in a skipped node's output
        return False
    if isinstance(container, str):
        if not isinstance(value, str):
            raise EvalError(f"'in <string>' needs a string on the left, not {type_name(value)}")
        return value in container
    if isinstance(container, Mapping):
        try:
            return value in container
        except TypeError:  # unhashable
            raise EvalError(f"cannot look up a {type_name(value)} key") from None
    values = sequence(container)
    if values is None:
        raise EvalError(f"cannot test membership in {type_name(container)}")
    return value in values
