"""The AST of cmesh expressions: frozen nodes (so parsed expressions can be cached
and shared) and the walks over them that the parser and the checker need."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True, slots=True)
class Const:
    value: Any  # str, int, float, bool or None only
    pos: int


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Attr:
    obj: Node
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Index:
    obj: Node
    index: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Node, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # 'not' or '-'
    operand: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # '+', '-', 'and' or 'or'
    left: Node
    right: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Compare:
    left: Node
    ops: tuple[str, ...]
    rights: tuple[Node, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple[Node, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class DictLit:
    keys: tuple[str, ...]
    values: tuple[Node, ...]
    pos: int


@dataclass(frozen=True, slots=True)
class FString:
    parts: tuple[Union[str, Node], ...]
    pos: int


Node = Union[Const, Ref, Attr, Index, Call, Unary, Binary, Compare, ListLit, DictLit, FString]


def _children(node: Node) -> Iterator[Node]:
    match node:
        case Attr(obj=obj):
            yield obj
        case Index(obj=obj, index=index):
            yield obj
            yield index
        case Call(args=items) | ListLit(items=items) | DictLit(values=items):
            yield from items
        case Unary(operand=operand):
            yield operand
        case Binary(left=left, right=right):
            yield left
            yield right
        case Compare(left=left, rights=rights):
            yield left
            yield from rights
        case FString(parts=parts):
            yield from (p for p in parts if not isinstance(p, str))


def _dotted(node: Node) -> tuple[str, ...] | None:
    if isinstance(node, Ref):
        return (node.name,)
    if isinstance(node, Attr):
        inner = _dotted(node.obj)
        return None if inner is None else inner + (node.name,)
    return None


def _collect_refs(node: Node, out: set[tuple[str, ...]]) -> None:
    path = _dotted(node)
    if path is not None:
        out.add(path)
        return
    for child in _children(node):
        _collect_refs(child, out)
