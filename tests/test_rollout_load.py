"""Acceptance: three live changes under steady load (unary calls and pipeline
runs, at least 2,000 requests during each) complete with zero failed requests,
and afterwards the new state answers, as the replicas report it."""
from loadtest.bench_rollout import bench


async def test_version_mode_and_weight_changes_under_load_fail_nothing() -> None:
    result = await bench(per_change=2000, workers=12, warm_s=3.0)
    for name, change in result["changes"].items():
        assert change["requests"] >= 2000, (name, change)
        assert change["failed"] == 0, (name, change["errors"])
    assert result["failed"] == 0
    # bench() returns only once every answer of m comes from version 2 and every
    # answer of w from variant b: the new state answers (cmesh-source, trace variants).
    assert result["switch_s"] >= 0
