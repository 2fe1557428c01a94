"""Cron parsing and scheduled minimums (active from lead before a fire until hours after)."""
from datetime import datetime, timedelta, timezone

import pytest

from autoscaler.schedule import Cron, CronError, active_schedules, scheduled_minimums
from cmesh.config import MeshConfig, load_config, parse_config
from meshtest import REPO

UTC = timezone.utc


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ------------------------------------------------------------------ parsing


def test_parse_fields() -> None:
    c = Cron.parse("*/15 9-17/2 1,15 * 1-5")
    assert c.minutes == (0, 15, 30, 45)
    assert c.hours == (9, 11, 13, 15, 17)
    assert c.days == {1, 15}
    assert c.months == set(range(1, 13))
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert c.day_restricted and c.weekday_restricted


def test_sunday_is_0_and_7() -> None:
    assert Cron.parse("0 0 * * 7").weekdays == {0}
    assert Cron.parse("0 0 * * 0").weekdays == {0}
    assert Cron.parse("0 0 * * 5-7").weekdays == {5, 6, 0}
    assert Cron.parse("0 0 * * *").weekdays == set(range(7))


def test_start_with_step_runs_to_the_end() -> None:
    assert Cron.parse("5/20 * * * *").minutes == (5, 25, 45)


@pytest.mark.parametrize("expr, fragment", [
    ("* * * *", "needs 5 fields"),
    ("* * * * * *", "needs 5 fields"),
    ("60 * * * *", "minute field '60': 60 is out of range 0-59"),
    ("* 24 * * *", "hour field '24': 24 is out of range 0-23"),
    ("* * 0 * *", "day-of-month field '0': 0 is out of range 1-31"),
    ("* * * 13 *", "month field '13': 13 is out of range 1-12"),
    ("* * * * 8", "day-of-week field '8': 8 is out of range 0-7"),
    ("5-1 * * * *", "range 5-1 is backwards"),
    ("*/0 * * * *", "step '0' must be a positive integer"),
    ("a * * * *", "'a' is not a number or a range"),
    ("1-x * * * *", "'1-x' is not a number or a range"),
])
def test_parse_errors_name_the_field(expr, fragment) -> None:
    with pytest.raises(CronError) as info:
        Cron.parse(expr)
    assert fragment in str(info.value) and repr(expr) in str(info.value)


# ----------------------------------------------------------------- matching


def test_weekday_range() -> None:
    c = Cron.parse("0 8 * * 1-5")
    assert at(2024, 1, 8).isoweekday() == 1                    # a Monday
    assert c.matches(at(2024, 1, 8, 8, 0))
    assert c.matches(at(2024, 1, 12, 8, 0))                   # Friday
    assert not c.matches(at(2024, 1, 13, 8, 0))               # Saturday
    assert not c.matches(at(2024, 1, 14, 8, 0))               # Sunday
    assert not c.matches(at(2024, 1, 8, 8, 1))


def test_or_semantics_when_both_day_fields_are_restricted() -> None:
    c = Cron.parse("0 0 13 * 5")                              # the 13th, or any Friday
    assert at(2024, 2, 13).isoweekday() == 2 and c.matches(at(2024, 2, 13))
    assert at(2024, 2, 16).isoweekday() == 5 and c.matches(at(2024, 2, 16))
    assert c.matches(at(2024, 9, 13))                          # both
    assert not c.matches(at(2024, 2, 14))


def test_and_semantics_when_a_day_field_starts_with_star() -> None:
    c = Cron.parse("0 0 */2 * 1")                             # Mondays that are odd days
    assert c.matches(at(2024, 1, 1))                          # Monday the 1st
    assert not c.matches(at(2024, 1, 8))                      # Monday the 8th
    assert not c.matches(at(2024, 1, 3))                      # Wednesday the 3rd


def test_matches_converts_to_utc_and_rejects_naive() -> None:
    c = Cron.parse("0 8 * * *")
    assert c.matches(datetime(2024, 1, 8, 9, 0, tzinfo=timezone(timedelta(hours=1))))
    with pytest.raises(ValueError, match="timezone-aware"):
        c.matches(datetime(2024, 1, 8, 8, 0))


def test_previous_fire() -> None:
    c = Cron.parse("0 8 * * 1-5")
    monday_early = at(2024, 1, 8, 7, 59, 30)
    assert c.previous_fire(monday_early, timedelta(days=3)) == at(2024, 1, 5, 8, 0)   # Friday
    assert c.previous_fire(monday_early, timedelta(days=2)) is None
    assert c.previous_fire(at(2024, 1, 8, 8, 0), 60) == at(2024, 1, 8, 8, 0)          # inclusive of now
    assert c.previous_fire(at(2024, 1, 8, 8, 0, 59), 60) == at(2024, 1, 8, 8, 0)
    assert Cron.parse("*/15 * * * *").previous_fire(at(2024, 1, 8, 10, 44, 59), 3600) == at(2024, 1, 8, 10, 30)
    assert Cron.parse("0 0 29 2 *").previous_fire(at(2024, 3, 1), timedelta(days=7)) == at(2024, 2, 29)


def test_previous_fire_matches_a_minute_scan() -> None:
    """The day-walking search agrees with the obvious minute-by-minute one."""
    exprs = ["0 8 * * 1-5", "*/7 3-5 * * *", "30 23 1,15 * 0", "0 0 13 * 5", "59 23 31 12 *"]
    starts = [at(2024, 1, 8, 7, 59), at(2024, 3, 1, 0, 0), at(2024, 12, 31, 23, 59), at(2024, 6, 15, 12, 34)]
    for expr in exprs:
        c = Cron.parse(expr)
        for now in starts:
            span = timedelta(days=2)
            expected = None
            t = now.replace(second=0)
            while t > now - span:
                if c.matches(t):
                    expected = t
                    break
                t -= timedelta(minutes=1)
            assert c.previous_fire(now, span) == expected, (expr, now)


# -------------------------------------------------------- scheduled minimums


@pytest.fixture(scope="module")
def mesh() -> MeshConfig:
    return load_config(REPO / "compose" / "mesh.yaml")


SUPPORT = {"intent-classifier", "embedder", "kb-index", "sql-executor", "dialogue-llm"}


def test_pipeline_schedule_raises_every_model_of_the_pipeline(mesh) -> None:
    mins = scheduled_minimums(mesh, at(2024, 1, 8, 10, 0), lead_s=120)
    assert mins == {m: 1 for m in SUPPORT}


def test_active_window_with_lead(mesh) -> None:
    lead = 120
    assert scheduled_minimums(mesh, at(2024, 1, 8, 7, 57, 59), lead) == {}
    assert scheduled_minimums(mesh, at(2024, 1, 8, 7, 58, 0), lead)       # 2 min before 08:00
    assert scheduled_minimums(mesh, at(2024, 1, 8, 17, 59, 59), lead)     # 10 h after
    assert scheduled_minimums(mesh, at(2024, 1, 8, 18, 0, 0), lead) == {}
    assert scheduled_minimums(mesh, at(2024, 1, 13, 10, 0), lead) == {}   # Saturday
    assert scheduled_minimums(mesh, at(2024, 1, 12, 17, 0), lead)         # Friday
    assert scheduled_minimums(mesh, at(2024, 1, 8, 7, 59), 0) == {}       # no lead


def with_schedules(schedules: list[dict]) -> MeshConfig:
    models = {m: {"source": "s"} for m in ("a", "b", "c")}
    return parse_config({"models": models, "schedules": schedules, "pipelines": {
        "p": {"nodes": {"x": {"model": "a"}, "y": {"model": "b", "input": "x.output"}}}}})


def test_overlapping_schedules_take_the_max() -> None:
    cfg = with_schedules([
        {"pipeline": "p", "cron": "0 8 * * *", "hours": 10, "min_replicas": 1},
        {"model": "a", "cron": "30 9 * * *", "hours": 1, "min_replicas": 3},
        {"model": "c", "cron": "0 9 * * *", "hours": 2, "min_replicas": 2},
    ])
    assert scheduled_minimums(cfg, at(2024, 1, 8, 10, 0), 0) == {"a": 3, "b": 1, "c": 2}
    assert scheduled_minimums(cfg, at(2024, 1, 8, 10, 30), 0) == {"a": 1, "b": 1, "c": 2}
    assert scheduled_minimums(cfg, at(2024, 1, 8, 11, 30), 0) == {"a": 1, "b": 1}
    active = active_schedules(cfg, at(2024, 1, 8, 10, 0), 0)
    assert [(a.index, a.fire, a.until) for a in active][1] == (1, at(2024, 1, 8, 9, 30), at(2024, 1, 8, 10, 30))


def test_schedules_longer_than_a_day() -> None:
    cfg = with_schedules([{"model": "c", "cron": "0 0 * * 1", "hours": 72, "min_replicas": 2}])
    assert scheduled_minimums(cfg, at(2024, 1, 10, 23, 59), 0) == {"c": 2}   # Wednesday night
    assert scheduled_minimums(cfg, at(2024, 1, 11, 0, 0), 0) == {}           # Thursday
    assert scheduled_minimums(cfg, at(2024, 1, 7, 23, 59), 120) == {"c": 2}  # Sunday, within the lead


def test_a_window_spanning_midnight() -> None:
    cfg = with_schedules([{"model": "c", "cron": "0 22 * * 5", "hours": 4, "min_replicas": 1}])
    assert scheduled_minimums(cfg, at(2024, 1, 13, 1, 59), 0) == {"c": 1}    # Saturday 01:59
    assert scheduled_minimums(cfg, at(2024, 1, 13, 2, 0), 0) == {}


def test_check_schedules_names_the_path() -> None:
    from autoscaler.schedule import check_schedules
    from cmesh.validation import ConfigError

    check_schedules(with_schedules([{"model": "a", "cron": "0 8 * * 1-5", "hours": 1}]))
    cfg = with_schedules([{"model": "a", "cron": "0 8 * * 1-5", "hours": 1},
                          {"model": "a", "cron": "61 8 * * *", "hours": 1}])
    with pytest.raises(ConfigError) as info:
        check_schedules(cfg)
    assert info.value.errors[0].startswith("schedules.1.cron: cron '61 8 * * *': minute field")
