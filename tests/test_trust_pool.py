"""The trust layer's worker processes (router.trust_pool): results, a worker that
dies, a caller that leaves mid-call, and the bound on waiting requests."""
from __future__ import annotations

import asyncio

import pytest

from cmesh.bytes_elements import Malformed, join_elements, split_elements
from cmesh.errors import ResourceExhausted, Unavailable
from router.trust_pool import MaskPool


def raw(*texts: str) -> bytes:
    return join_elements(t.encode() for t in texts)


async def test_masks_in_a_worker_and_reports_malformed_data() -> None:
    pool = MaskPool(workers=1)
    try:
        new, counts, saw_text = await pool.run("mask_raw", raw("mail a@b.co", "no pii"), 2)
        assert split_elements(new, 2) == [b"mail [EMAIL]", b"no pii"]
        assert counts["email"] == 1 and saw_text
        with pytest.raises(Malformed):
            await pool.run("mask_raw", raw("one"), 2)
    finally:
        pool.close()


async def test_a_worker_dying_mid_call_fails_that_call_only() -> None:
    pool = MaskPool(workers=1)
    try:
        await pool.start()
        victim = pool._all[0]
        call = asyncio.create_task(pool.run("mask_raw", raw("call +44 20 7946 0958 now " * 40_000), 1))
        await asyncio.sleep(0.05)
        victim.proc.kill()
        with pytest.raises(Unavailable):
            await call
        new, _, _ = await pool.run("mask_raw", raw("x@y.io"), 1)
        assert split_elements(new, 1) == [b"[EMAIL]"]
    finally:
        pool.close()


async def test_a_caller_that_leaves_does_not_confuse_the_next_one() -> None:
    pool = MaskPool(workers=1)
    try:
        big = raw("call +44 20 7946 0958 now " * 20_000)
        first = asyncio.create_task(pool.run("mask_raw", big, 1))
        await asyncio.sleep(0.05)
        first.cancel()
        new, counts, _ = await pool.run("mask_raw", raw("small z@q.de"), 1)
        assert split_elements(new, 1) == [b"small [EMAIL]"] and counts["email"] == 1
    finally:
        pool.close()


async def test_waiting_requests_are_bounded() -> None:
    pool = MaskPool(workers=1, max_waiting=2)
    try:
        big = raw("call +44 20 7946 0958 now " * 20_000)
        calls = [asyncio.create_task(pool.run("mask_raw", big, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted):
            await pool.run("mask_raw", big, 1)
        await asyncio.gather(*calls)
    finally:
        pool.close()


async def test_a_worker_that_died_while_idle_is_replaced_before_use() -> None:
    pool = MaskPool(workers=1)
    try:
        await pool.start()
        dead = pool._all[0]
        dead.proc.kill()
        await dead.proc.wait()
        await asyncio.sleep(0.05)            # let the pipes notice
        new, _, _ = await pool.run("mask_raw", raw("x@y.io"), 1)
        assert split_elements(new, 1) == [b"[EMAIL]"]
        assert pool._all and pool._all[0] is not dead
    finally:
        pool.close()
