"""loadtest.sim_paper's comparison with static at equal P95: the cheapest static at least as fast."""
from types import SimpleNamespace

from loadtest.sim_paper import PIPE, equal_p95_static


def result(p95: float, drops: int = 0, llm: int = 0) -> SimpleNamespace:
    return SimpleNamespace(by_target={PIPE: {"p95_ms": p95}}, totals={"drops": drops}, llm=llm)


def static_runs(p95_of):
    """A fake ``go``: a static run's P95 from its LLM count; every run recorded."""
    runs = []

    def go(name, strategy, static_counts):
        assert name == "diurnal" and strategy == "static"
        n = static_counts["dialogue-llm"]
        runs.append(n)
        return result(p95_of(n), llm=n)
    return go, runs


def test_the_cheapest_static_no_slower_than_per_model_is_found_by_bisection() -> None:
    per = result(4000.0)
    go, runs = static_runs(lambda n: 3000.0 + 20000.0 / n)          # 20 replicas give 4,000 ms
    best, factor, at_peak = equal_p95_static(go, "diurnal", per, {"dialogue-llm": 64, "embedder": 2}, steps=5)
    assert runs[0] == 64 and at_peak.llm == 64
    assert best.by_target[PIPE]["p95_ms"] <= 4000.0 and 20 <= best.llm <= 22
    assert round(64 * factor) == best.llm
    assert len(runs) == 6                                           # the peak, then five halvings


def test_static_at_the_peak_slower_than_per_model_is_the_comparison_itself() -> None:
    go, runs = static_runs(lambda n: 9000.0)
    best, factor, at_peak = equal_p95_static(go, "diurnal", result(4000.0), {"dialogue-llm": 10}, steps=5)
    assert factor == 1.0 and best is at_peak and runs == [10]


def test_a_static_that_drops_more_than_per_model_is_not_as_fast() -> None:
    per = result(4000.0, drops=5)
    go, runs = static_runs(lambda n: 100.0)                          # fast, but ...

    def dropping(name, strategy, static_counts):
        r = go(name, strategy, static_counts)
        r.totals["drops"] = 0 if static_counts["dialogue-llm"] >= 32 else 50   # ... drops below 32
        return r

    best, factor, _ = equal_p95_static(dropping, "diurnal", per, {"dialogue-llm": 64}, steps=5)
    assert best.llm == 32 and factor == 0.5
