"""The trust layer's work on tensors, pure and picklable: mask the PII in BYTES
elements, and redact named fields of JSON outputs.

Kept apart from ``trust_io`` so that a worker process (``router.trust_worker``)
imports only this, ``router.trust`` and ``cmesh.bytes_elements``: large texts are
masked there, off the router's event loop, and the worker starts in milliseconds.
Malformed elements raise ``cmesh.bytes_elements.Malformed``.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

from cmesh.bytes_elements import join_elements, split_elements
from router.trust import mask_texts

REDACTED = "[REDACTED]"
# A JSON output nested deeper than this is left as it is: it cannot be one of the
# row-shaped answers that field redaction exists for, and recursion must stay bounded.
MAX_JSON_DEPTH = 32


def _redact(value, fields: frozenset[str], counts: list[int], depth: int = 0):
    if depth > MAX_JSON_DEPTH:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in fields and v is not None:
                out[k] = REDACTED
                counts[0] += 1
            else:
                out[k] = _redact(v, fields, counts, depth + 1)
        return out
    if isinstance(value, list):
        return [_redact(v, fields, counts, depth + 1) for v in value]
    return value


def redact_json(text: str, fields: frozenset[str]) -> tuple[str, int]:
    """``text`` with the values of ``fields`` replaced, if it is JSON; and how many."""
    if not fields or not text or text[0] not in "[{":
        return text, 0
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text, 0
    counts = [0]
    redacted = _redact(value, fields, counts)
    if not counts[0]:
        return text, 0
    return json.dumps(redacted, ensure_ascii=False, separators=(",", ":")), counts[0]


def mask_values(values: Sequence[bytes], fields: Iterable[str] = ()) -> tuple[list[bytes] | None, Counter, bool]:
    """Mask every UTF-8 element of ``values`` (binary elements are left alone).
    Returns (the new elements, or None when nothing changed; counts per kind; whether
    any element was text)."""
    fields = frozenset(fields)
    texts, positions = [], []
    for j, value in enumerate(values):
        try:
            texts.append(bytes(value).decode("utf-8"))
            positions.append(j)
        except UnicodeDecodeError:
            continue
    if not texts:
        return None, Counter(), False
    masked, counts = mask_texts(texts)
    if fields:
        for i, text in enumerate(masked):
            masked[i], n = redact_json(text, fields)
            if n:
                counts["field"] += n
    if not sum(counts.values()):
        return None, counts, True
    out = list(values)
    for j, text in zip(positions, masked):
        out[j] = text.encode("utf-8")
    return out, counts, True


def mask_raw(raw: bytes, count: int, fields: Iterable[str] = ()) -> tuple[bytes | None, Counter, bool]:
    """``mask_values`` over a tensor in the raw wire form (length-prefixed elements)."""
    out, counts, saw_text = mask_values(split_elements(raw, count), fields)
    if out is None:
        return None, counts, saw_text
    return join_elements(out), counts, saw_text
