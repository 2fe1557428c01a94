"""The OIP's raw form of BYTES tensors: each element a 4-byte little-endian length,
then its bytes. Plain ``struct``, no other import, so a worker process that only
masks texts (router.trust_worker) starts in milliseconds."""
from __future__ import annotations

import struct
from collections.abc import Iterable

_LEN = struct.Struct("<I")


class Malformed(ValueError):
    """The raw bytes do not hold the elements their shape declares."""


def split_elements(raw: bytes, count: int) -> list[bytes]:
    # Every element takes at least its 4-byte length: a count the bytes cannot
    # hold is refused before anything is allocated for it.
    if count * 4 > len(raw):
        raise Malformed(f"BYTES data of {len(raw)} bytes cannot hold the {count} elements its shape declares")
    out = []
    offset, end = 0, len(raw)
    unpack = _LEN.unpack_from
    for i in range(count):
        if offset + 4 > end:
            raise Malformed(f"BYTES data holds fewer than the {count} elements its shape declares")
        (length,) = unpack(raw, offset)
        offset += 4
        if offset + length > end:
            raise Malformed(f"BYTES element {i} is truncated")
        out.append(raw[offset:offset + length])
        offset += length
    if offset != end:
        raise Malformed(f"BYTES data holds more than the {count} elements its shape declares")
    return out


def join_elements(values: Iterable[bytes]) -> bytes:
    pack = _LEN.pack
    parts = []
    for data in values:
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)
