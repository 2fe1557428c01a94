"""Scheduled minimums: cron expressions that raise replicas ahead of known peaks.

A schedule ``{cron: "0 8 * * 1-5", hours: 10, min_replicas: 1}`` fires at 08:00
on weekdays and holds its minimum for 10 hours. It is *active* from
``lead_s`` before a fire time (so replicas are warm when the peak starts) until
``hours`` after it:

    active at t  ⇔  some fire time f has  f - lead_s <= t < f + hours
                 ⇔  the latest fire time <= t + lead_s is later than t - hours

so one backward search per schedule answers it. The search walks days, not
minutes: for each candidate day (at most ``hours + lead`` back, ≤ 9 days) it
checks the day fields once and then takes the largest matching hour and minute
directly, which is cheap enough to run every tick.

Times are evaluated in UTC (``mesh.yaml`` has no time zone field); callers pass
a timezone-aware ``datetime`` from an injected wall clock.

Cron syntax: five fields (minute hour day-of-month month day-of-week), each
``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of
those. Day-of-week is 0-7 with both 0 and 7 meaning Sunday. As in Vixie cron,
when both day-of-month and day-of-week are restricted (neither starts with
``*``) a day matches if *either* does; otherwise both must.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from cmesh.config import MeshConfig, ScheduleConfig
from cmesh.validation import ConfigError

from autoscaler.prewarm import models_of_pipeline

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
           ("day-of-week", 0, 7))


class CronError(ValueError):
    """An invalid cron expression; the message names the field and the problem."""


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: tuple[int, ...]      # sorted ascending
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]      # 0 = Sunday … 6 = Saturday (7 folded into 0)
    day_restricted: bool          # day-of-month field does not start with '*'
    weekday_restricted: bool

    @classmethod
    def parse(cls, text: str) -> "Cron":
        return _parse(text)

    def matches_day(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = day.isoweekday() % 7 in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def matches(self, t: datetime) -> bool:
        t = _utc(t)
        return t.minute in self.minutes and t.hour in self.hours and self.matches_day(t)

    def previous_fire(self, now: datetime, lookback: timedelta | float) -> datetime | None:
        """The latest fire time ``f`` with ``now - lookback < f <= now``, or None."""
        now = _utc(now)
        span = lookback if isinstance(lookback, timedelta) else timedelta(seconds=lookback)
        earliest = now - span
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        limit = (now.hour, now.minute)        # today: only times not after now
        for _ in range(span.days + 2):
            if day + timedelta(days=1) <= earliest:
                return None
            if self.matches_day(day):
                hm = self._latest_time(limit)
                if hm is not None:
                    fire = day.replace(hour=hm[0], minute=hm[1])
                    return fire if fire > earliest else None
            day -= timedelta(days=1)
            limit = (23, 59)
        return None

    def _latest_time(self, limit: tuple[int, int]) -> tuple[int, int] | None:
        """Largest (hour, minute) of the expression not after ``limit``."""
        for h in reversed(self.hours):
            if h > limit[0]:
                continue
            cap = limit[1] if h == limit[0] else 59
            for m in reversed(self.minutes):
                if m <= cap:
                    return h, m
        return None


@lru_cache(maxsize=256)
def _parse(text: str) -> Cron:
    fields = text.split()
    if len(fields) != 5:
        raise CronError(f"cron {text!r}: needs 5 fields (minute hour day-of-month month day-of-week), "
                        f"got {len(fields)}")
    values = [_parse_field(text, f, *spec) for f, spec in zip(fields, _FIELDS)]
    weekdays = frozenset(0 if d == 7 else d for d in values[4])
    return Cron(text=text, minutes=tuple(sorted(values[0])), hours=tuple(sorted(values[1])),
                days=frozenset(values[2]), months=frozenset(values[3]), weekdays=weekdays,
                day_restricted=not fields[2].startswith("*"),
                weekday_restricted=not fields[4].startswith("*"))


def _parse_field(text: str, field: str, name: str, lo: int, hi: int) -> set[int]:
    def bad(why: str) -> CronError:
        return CronError(f"cron {text!r}: {name} field {field!r}: {why}")

    out: set[int] = set()
    for part in field.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise bad(f"step {step_text!r} must be a positive integer")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        else:
            first, dash, last = rng.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise bad(f"{rng!r} is not a number or a range a-b")
            a = int(first)
            b = int(last) if dash else (hi if step_text else a)   # "5/15" means 5-max/15
            for v in (a, b):
                if not lo <= v <= hi:
                    raise bad(f"{v} is out of range {lo}-{hi}")
            if a > b:
                raise bad(f"range {a}-{b} is backwards")
        out.update(range(a, b + 1, step))
    return out


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("schedules need a timezone-aware datetime (UTC); got a naive one")
    return t.astimezone(timezone.utc)


# ------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class ActiveSchedule:
    index: int                    # position in mesh.yaml's schedules list
    schedule: ScheduleConfig
    fire: datetime                # the fire time this activation belongs to
    until: datetime               # fire + hours
    models: tuple[str, ...]


def active_schedules(config: MeshConfig, now: datetime, lead_s: float) -> list[ActiveSchedule]:
    """Schedules active at ``now`` (from ``lead_s`` before a fire time until
    ``hours`` after it)."""
    now = _utc(now)
    out = []
    for i, sched in enumerate(config.schedules):
        duration = timedelta(hours=sched.hours)
        lead = timedelta(seconds=lead_s)
        # Latest fire time f <= now + lead with f > now - hours: see the module docstring.
        fire = Cron.parse(sched.cron).previous_fire(now + lead, duration + lead)
        if fire is None:
            continue
        models = (tuple(models_of_pipeline(config, sched.pipeline)) if sched.pipeline is not None
                  else (sched.model or "",))
        out.append(ActiveSchedule(index=i, schedule=sched, fire=fire, until=fire + duration, models=models))
    return out


def scheduled_minimums(config: MeshConfig, now: datetime, lead_s: float) -> dict[str, int]:
    """Minimum replicas per model that active schedules ask for; a pipeline
    schedule covers every model of the pipeline, overlapping schedules take the
    max. Models without an active schedule are absent (minimum 0)."""
    mins: dict[str, int] = {}
    for active in active_schedules(config, now, lead_s):
        for model in active.models:
            mins[model] = max(mins.get(model, 0), active.schedule.min_replicas)
    return mins



def check_schedules(config: MeshConfig, source: str = "mesh.yaml") -> None:
    """Raise ConfigError naming ``schedules.<i>.cron`` for values the config's
    syntax check lets through but cron forbids (``60 * * * *``, ``5-1 …``)."""
    errors = []
    for i, sched in enumerate(config.schedules):
        try:
            Cron.parse(sched.cron)
        except CronError as exc:
            errors.append(f"schedules.{i}.cron: {exc}")
    if errors:
        raise ConfigError(source, errors)
