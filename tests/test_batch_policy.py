"""The batch-forming policy, as a pure function of the queue and the clock."""
from model_server.batching.policy import BatchPolicy, Pending, decide

P = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.010, buckets=(16, 64))


def pend(*arrivals, rows=1, bucket=0):
    return [Pending(arrived=a, rows=rows, bucket=bucket) for a in arrivals]


def test_waits_for_batch_mates_until_the_delay() -> None:
    d = decide(P, pend(0.0, 0.001), now=0.002)
    assert d.take == () and d.wake_at == 0.010
    assert decide(P, pend(0.0, 0.001), now=0.010).take == (0, 1)


def test_full_batch_runs_at_once_and_leaves_the_rest() -> None:
    d = decide(P, pend(0.0, 0.0, 0.0, 0.0, 0.0), now=0.0)
    assert d.take == (0, 1, 2, 3)


def test_rows_count_and_oversized_requests_are_skipped_not_split() -> None:
    pending = [Pending(0.0, 3), Pending(0.0, 2), Pending(0.0, 1)]
    assert decide(P, pending, now=1.0).take == (0, 2)        # 3 + 1; the 2-row request waits
    assert decide(P, [Pending(0.0, 9)], now=1.0).take == (0,)  # bigger than a batch: alone


def test_buckets_keep_lengths_together_and_oldest_first() -> None:
    assert P.bucket_of(10) == 0 and P.bucket_of(16) == 0 and P.bucket_of(17) == 1 and P.bucket_of(999) == 2
    pending = [Pending(0.0, 1, 0), Pending(0.001, 1, 1), Pending(0.002, 1, 0)]
    assert decide(P, pending, now=0.020).take == (0, 2)


def test_a_full_later_bucket_does_not_wait_for_the_head() -> None:
    pending = [Pending(0.0, 1, 0)] + [Pending(0.001, 1, 1)] * 4
    assert decide(P, pending, now=0.002).take == (1, 2, 3, 4)


def test_flush_on_shutdown_ignores_the_delay() -> None:
    assert decide(P, pend(0.0), now=0.0, flush=True).take == (0,)
    assert decide(P, [], now=0.0).take == ()
