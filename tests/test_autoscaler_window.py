"""MetricsWindow: per-model load, summed across routers, averaged over windows."""
import pytest

from autoscaler.window import MetricsWindow


def feed(w: MetricsWindow, model: str, start: float, stop: float, value: float, source: str = "r1",
         step: float = 1.0, arrivals: int = 0, held: int = 0) -> None:
    t = start
    while t < stop - 1e-9:
        w.add(model, t, value, arrivals=arrivals, held=held, source=source)
        t += step


def test_no_data_is_none_not_zero() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    assert w.average_concurrency("m", 100.0, 60) is None
    assert w.last_sample_age("m", 100.0) is None
    assert w.last_traffic("m") is None
    assert w.held("m", 100.0) == 0


def test_steady_load_averages_to_itself() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    feed(w, "m", 0, 60, 10.0)
    assert w.average_concurrency("m", 59.5, 60) == pytest.approx(10.0)
    assert w.average_concurrency("m", 59.5, 6) == pytest.approx(10.0)
    assert w.last_sample_age("m", 61.0) == pytest.approx(2.0)


def test_two_routers_add_up_even_out_of_phase() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    # r1 reports early in each second, r2 late: no bucket holds both, yet the
    # model's load is their sum throughout.
    feed(w, "m", 0.1, 30, 4.0, source="r1")
    feed(w, "m", 0.9, 30, 6.0, source="r2")
    assert w.average_concurrency("m", 29.95, 10) == pytest.approx(10.0)
    assert w.concurrency("m", 29.95) == pytest.approx(10.0)


def test_repeated_reports_in_one_bucket_keep_the_latest() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    w.add("m", 10.1, 50.0, source="r1")
    w.add("m", 10.5, 5.0, source="r1")        # same source, same bucket: replaces
    w.add("m", 10.3, 99.0, source="r1")       # arrived late, older: ignored
    assert w.average_concurrency("m", 10.9, 1) == pytest.approx(5.0)


def test_a_source_that_stops_ages_out() -> None:
    w = MetricsWindow(60, source_ttl_s=3)
    for t in range(40):
        if t < 20:
            w.add("m", t + 0.5, 5.0, source="dead")
        w.add("m", t + 0.5, 2.0, source="alive")
        if t == 20:
            # Its share still shows in a window that covers its last reports.
            assert w.average_concurrency("m", t + 0.6, 4) > 2.0
    # 'dead' last reported at 19.5; from 22.5 on it no longer counts.
    assert w.concurrency("m", 39.6) == pytest.approx(2.0)
    assert w.average_concurrency("m", 39.6, 10) == pytest.approx(2.0)


def test_window_average_reacts_to_a_burst_more_in_the_short_window() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    feed(w, "m", 0, 54, 8.0)
    feed(w, "m", 54, 60, 80.0)
    stable = w.average_concurrency("m", 60.0, 60)
    panic = w.average_concurrency("m", 60.0, 6)
    assert panic == pytest.approx(80.0)
    assert stable == pytest.approx((54 * 8 + 6 * 80) / 60)
    # Half a second earlier, the short window still covers half a second of the old load.
    assert w.average_concurrency("m", 59.5, 6) == pytest.approx((0.5 * 8 + 5.5 * 80) / 6)


def test_new_model_is_averaged_over_its_own_data_not_diluted() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    feed(w, "m", 100, 103, 12.0)
    assert w.average_concurrency("m", 102.5, 60) == pytest.approx(12.0)


def test_window_without_samples_is_missing() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    feed(w, "m", 0, 10, 3.0)
    assert w.average_concurrency("m", 20.0, 6) is None      # last report at 9: outside (14, 20]
    assert w.average_concurrency("m", 20.0, 60) is not None


def test_held_sums_fresh_sources() -> None:
    w = MetricsWindow(60, source_ttl_s=2)
    w.add("m", 10.0, 0, held=3, source="r1")
    w.add("m", 10.2, 0, held=2, source="r2")
    assert w.held("m", 10.5) == 5
    w.add("m", 11.0, 0, held=0, source="r1")               # r1 released its requests
    assert w.held("m", 11.1) == 2
    assert w.held("m", 13.0) == 0                          # r2's report is too old to trust


def test_last_traffic_ignores_zero_reports() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    w.add("m", 5.0, 0.0)
    assert w.last_traffic("m") is None
    w.add("m", 6.0, 0.0, arrivals=2)
    w.add("m", 7.0, 0.0)
    w.add("m", 8.0, 0.0, held=1)
    w.add("m", 9.0, 0.0)
    assert w.last_traffic("m") == 8.0
    assert w.last_sample_age("m", 9.5) == pytest.approx(0.5)


def test_models_are_independent() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    feed(w, "a", 0, 10, 500.0)
    feed(w, "b", 0, 10, 1.0)
    assert w.average_concurrency("b", 9.5, 60) == pytest.approx(1.0)


def test_arrivals_are_summed_per_source() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    w.add("m", 1.1, 1, arrivals=3, source="r1")
    w.add("m", 1.5, 1, arrivals=4, source="r1")
    w.add("m", 1.7, 1, arrivals=5, source="r2")
    assert w.arrivals("m", 2.0, 10) == 12


def test_memory_is_bounded() -> None:
    w = MetricsWindow(10, source_ttl_s=2, bucket_s=1)
    for i in range(5000):
        w.add("m", i * 0.5, 1.0, source=f"r{i % 3}")
    series = w._series["m"]
    assert len(series.buckets) <= 10 + 2 + 2
    assert w.average_concurrency("m", 2499.6, 10) == pytest.approx(3.0)
    assert w.last_traffic("m") == 2499.5


def test_rejects_negative_values() -> None:
    with pytest.raises(ValueError):
        MetricsWindow(60).add("m", 0, -1)
    with pytest.raises(ValueError):
        MetricsWindow(0)


def test_latest_for_status() -> None:
    w = MetricsWindow(60, source_ttl_s=5)
    assert w.latest("m") is None
    w.add("m", 1.0, 3.0, held=1, source="r1")
    w.add("m", 2.0, 4.0, source="r2")
    assert w.latest("m") == {"t": 2.0, "concurrency": 7.0, "held": 1.0}


def test_silence_after_the_last_report_counts_as_zero_in_bounded_time() -> None:
    w = MetricsWindow(60, source_ttl_s=2)
    feed(w, "m", 0, 10, 6.0)                       # reports at 0..9
    # (0, 30]: 6 in flight until 9 + 2 (TTL), then nothing.
    assert w.average_concurrency("m", 30.0, 30) == pytest.approx(6.0 * 11 / 30)
    assert w.average_concurrency("m", 1e9, 2e9) == pytest.approx(6.0 * 11 / 1e9)
