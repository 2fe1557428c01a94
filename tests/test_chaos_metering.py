"""The chaos tool, small: a router on Redis keeps metering exactly once through a
SIGKILL of redis-server (loadtest.chaos_metering, run with 300 requests)."""
from loadtest.chaos_metering import measure


def test_redis_killed_mid_traffic_loses_no_metering_event() -> None:
    result = measure(requests=300, outage_s=2.0, concurrency=16, log=lambda line: None)
    assert result["sent"] == 300
    assert result["answered_during_outage"] > 0 and result["spooled"] > 0   # the outage hit
    assert result["lost"] == 0 and result["missing_ids"] == 0 and result["duplicates"] == 0
    assert result["metered"] == result["ok"]
    assert result["replayed"] == result["spooled"] and result["dropped"] == 0
    assert result["metering_failed_logs"] == 0
