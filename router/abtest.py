"""Weighted choice of a model variant (component-level A/B tests).

With a session key the choice is sticky: the key hashes (blake2b, stable across
processes, machines and Python versions - unlike ``hash()``) to a point u in
[0, 1), and u falls into one variant's slice of the cumulative weights, laid out
in sorted-name order. Every router replica therefore sends one session to the
same variant with no shared state. Without a session the point is drawn from the
injected ``random.Random`` (seed it in tests).

Zero-weight variants have an empty slice and are never chosen. When weights
change, only sessions whose point lies between an old and a new slice boundary
move. With two variants that is the minimum possible (moving 90/10 to 80/20
moves exactly 10% of sessions, all from a to b); with three or more, changing
one weight also shifts the slices after it in name order, so a few more sessions
move than strictly needed - acceptable for experiments that are usually A/B.

``salt`` (typically the model name) decorrelates experiments: without it the
same sessions would land in the first slice of every model's test.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping


_SCALE = float(1 << 64)


def session_point(session: str, salt: str = "") -> float:
    """A stable, uniform point in [0, 1) for a session key."""
    digest = hashlib.blake2b(f"{salt}\x00{session}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def choose_variant(variants: Mapping[str, float], session: str | None, rng: random.Random,
                   *, salt: str = "") -> str:
    """The variant for one request. ``variants`` maps name -> weight (>= 0, not
    all 0); an empty session counts as none."""
    if not variants:
        raise ValueError("variants: must not be empty")
    if any(w < 0 for w in variants.values()):
        raise ValueError("variants: weights must be >= 0")
    names = [name for name in sorted(variants) if variants[name] > 0]
    if not names:
        raise ValueError("variants: weights must not all be 0")
    if len(names) == 1:
        return names[0]
    total = sum(variants[name] for name in names)
    point = session_point(session, salt) if session else rng.random()
    target = point * total
    cumulative = 0.0
    for name in names:
        cumulative += variants[name]
        if target < cumulative:
            return name
    return names[-1]          # rounding put the point on the very end

