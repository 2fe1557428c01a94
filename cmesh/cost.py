"""The cost report: metered usage rows priced by the config (pure; no I/O).

Input rows come from a meter (``router.metering``) or anything with the same
attributes; output is a ``CostReport`` that the Admin service sends as
``cmesh.v1.CostReportResponse`` and ``cmesh cost`` prints. Per row:

    cost = compute_s × price.replica_second
         + input tokens / 1000 × price.per_1k_input_tokens
         + output tokens / 1000 × price.per_1k_output_tokens

with the prices of the row's model, where a direction without a price of its own
takes ``price.per_1k_tokens`` (the simple case: one price for every token). A
model missing from the config costs 0 but still appears, so usage is never
silently dropped. A report also says when the
store lacks usage the router accepted (events spooled through a Redis outage, or
dropped): ``incomplete``, and ``format_warning`` words it for people.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

from cmesh.config import MeshConfig
from protos import mesh_pb2

GROUP_BY = ("pipeline", "tenant", "model", "variant")
NONE_KEY = "(none)"
OK = "OK"


class UsageRow(Protocol):
    """What the report needs from one aggregate row (``router.metering.MeterRow``)."""

    tenant: str
    pipeline: str
    model: str
    variant: str
    latency_class: str
    status: str
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def compute_s(self) -> float: ...


@dataclass(frozen=True)
class CostLine:
    key: str
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    compute_s: float = 0.0
    cost: float = 0.0
    external_compute_s: float = 0.0     # of compute_s: on external (oip) backends

    def plus(self, other: "CostLine", key: str | None = None) -> "CostLine":
        return CostLine(key=self.key if key is None else key,
                        requests=self.requests + other.requests,
                        errors=self.errors + other.errors,
                        input_tokens=self.input_tokens + other.input_tokens,
                        output_tokens=self.output_tokens + other.output_tokens,
                        compute_s=self.compute_s + other.compute_s,
                        cost=self.cost + other.cost,
                        external_compute_s=self.external_compute_s + other.external_compute_s)


@dataclass(frozen=True)
class CostReport:
    group_by: str
    rows: tuple[CostLine, ...]
    total: CostLine
    spooled_events: int = 0       # accepted by the router, waiting for the store (not in rows yet)
    dropped_events: int = 0       # accepted by the router and lost (its spool was full)

    @property
    def incomplete(self) -> bool:
        return self.spooled_events > 0 or self.dropped_events > 0


def check_group_by(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by: must be one of {', '.join(GROUP_BY)}; got {group_by!r}")
    return group_by


def group_key(row: UsageRow, group_by: str) -> str:
    if group_by == "variant":
        return f"{row.model}:{row.variant or NONE_KEY}"
    return getattr(row, group_by) or NONE_KEY


def price(config: MeshConfig, model: str, compute_s: float, input_tokens: int, output_tokens: int) -> float:
    """What one use of ``model`` costs: its compute share at the replica-second
    price plus its input and output tokens each at their per-1k price (unknown
    models cost 0)."""
    spec = config.models.get(model)
    if spec is None:
        return 0.0
    per_in, per_out = spec.price.token_prices()
    return compute_s * spec.price.replica_second + input_tokens / 1000 * per_in + output_tokens / 1000 * per_out


@dataclass(frozen=True)
class IdleLine:
    model: str
    replica_s: float          # ready replica time the mesh paid for
    used_s: float             # compute seconds requests used on it
    idle_s: float
    idle_cost: float


def idle_capacity(replica_seconds: dict[str, float], used: dict[str, float], config: MeshConfig
                  ) -> list[IdleLine]:
    """Capacity no request used: each model's ready replica-seconds minus the
    compute seconds metered on it (``used``, by model), at its replica-second price."""
    lines = []
    for model, replica_s in sorted(replica_seconds.items()):
        idle = max(0.0, replica_s - used.get(model, 0.0))
        spec = config.models.get(model)
        lines.append(IdleLine(model, replica_s, used.get(model, 0.0), idle,
                              idle * (spec.price.replica_second if spec else 0.0)))
    return lines


def format_idle(lines: list[IdleLine]) -> str:
    out = [f"{'idle capacity':<18} {'replica_s':>10} {'used_s':>9} {'idle_s':>10} {'idle_cost':>10}"]
    for line in lines:
        out.append(f"{line.model:<18} {line.replica_s:10.1f} {line.used_s:9.3f} {line.idle_s:10.1f} "
                   f"{line.idle_cost:10.6f}")
    out.append(f"{'total':<18} {sum(l.replica_s for l in lines):10.1f} {sum(l.used_s for l in lines):9.3f} "
               f"{sum(l.idle_s for l in lines):10.1f} {sum(l.idle_cost for l in lines):10.6f}")
    return "\n".join(out)


def price_row(row: UsageRow, config: MeshConfig) -> float:
    return price(config, row.model, row.compute_s, row.input_tokens, row.output_tokens)


def _sort_key(row: UsageRow) -> tuple:
    return (row.tenant, row.pipeline, row.model, row.variant, row.latency_class, row.status)


def build_report(rows: Iterable[UsageRow], config: MeshConfig, group_by: str, *,
                 spooled_events: int = 0, dropped_events: int = 0) -> CostReport:
    """Group, price and total ``rows``; lines sorted by cost (highest first), then key.
    ``spooled_events`` and ``dropped_events``: usage the rows lack (see ``CostReport``)."""
    check_group_by(group_by)
    if spooled_events < 0 or dropped_events < 0:
        raise ValueError("spooled_events and dropped_events: must be >= 0")
    groups: dict[str, CostLine] = {}
    # Float sums depend on order: a canonical order makes equal row sets (from
    # different stores, listed differently) give bit-identical reports.
    for row in sorted(rows, key=_sort_key):
        key = group_key(row, group_by)
        line = CostLine(key=key, requests=row.requests,
                        errors=row.requests if row.status != OK else 0,
                        input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                        compute_s=row.compute_s, cost=price_row(row, config),
                        external_compute_s=getattr(row, "external_compute_s", 0.0))
        groups[key] = groups[key].plus(line) if key in groups else line
    lines = tuple(sorted(groups.values(), key=lambda line: (-line.cost, line.key)))
    return CostReport(group_by=group_by, rows=lines, total=_total(lines),
                      spooled_events=spooled_events, dropped_events=dropped_events)


def _total(lines: Iterable[CostLine]) -> CostLine:
    total = CostLine(key="total")
    for line in lines:
        total = total.plus(line, key="total")
    return total


_COLUMNS = (("requests", "{:d}"), ("errors", "{:d}"), ("input_tokens", "{:d}"),
            ("output_tokens", "{:d}"), ("compute_s", "{:.3f}"), ("cost", "{:.6f}"))


def format_table(report: CostReport) -> str:
    """An aligned text table, one line per group, then a rule and the total; with
    external backends in it, an ``external_s`` column marks their share of compute."""
    columns = _COLUMNS
    if report.total.external_compute_s or any(line.external_compute_s for line in report.rows):
        columns = (*_COLUMNS, ("external_compute_s", "{:.3f}"))
    header = [report.group_by] + ["external_s" if name == "external_compute_s" else name for name, _ in columns]
    body = [[line.key] + [fmt.format(getattr(line, name)) for name, fmt in columns]
            for line in report.rows]
    total = [report.total.key] + [fmt.format(getattr(report.total, name)) for name, fmt in columns]
    widths = [max(len(r[i]) for r in [header, *body, total]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    out = [render(header)]
    out += [render(r) for r in body] if body else ["(no metered requests)"]
    out += ["-" * len(render(header)), render(total)]
    return "\n".join(out)


def format_warning(report: CostReport) -> str:
    """One line saying why and by how much the report is short; "" when it is complete."""
    if not report.incomplete:
        return ""
    parts = []
    if report.spooled_events:
        parts.append(f"{report.spooled_events} metering events are waiting in the router's spool "
                     "for Redis (they are counted once it is back)")
    if report.dropped_events:
        parts.append(f"{report.dropped_events} were dropped and will never be counted")
    return (f"WARNING: incomplete cost report: {'; '.join(parts)}; the totals are short by "
            f"{report.spooled_events + report.dropped_events} requests or more")


def to_json(report: CostReport) -> dict:
    return {"group_by": report.group_by, "rows": [asdict(line) for line in report.rows],
            "total": asdict(report.total), "incomplete": report.incomplete,
            "spooled_events": report.spooled_events, "dropped_events": report.dropped_events}


def report_to_proto(report: CostReport) -> mesh_pb2.CostReportResponse:
    return mesh_pb2.CostReportResponse(
        group_by=report.group_by,
        rows=[mesh_pb2.CostRow(**asdict(line)) for line in report.rows],
        total_cost=report.total.cost, total_compute_s=report.total.compute_s,
        incomplete=report.incomplete, spooled_events=report.spooled_events,
        dropped_events=report.dropped_events)


def report_from_proto(message: mesh_pb2.CostReportResponse) -> CostReport:
    """The report back; counts are re-totalled from the rows (the message carries
    only cost and compute totals, which are taken as sent)."""
    lines = tuple(CostLine(key=r.key, requests=r.requests, errors=r.errors,
                           input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                           compute_s=r.compute_s, cost=r.cost, external_compute_s=r.external_compute_s)
                  for r in message.rows)
    counted = _total(lines)
    total = CostLine(key="total", requests=counted.requests, errors=counted.errors,
                     input_tokens=counted.input_tokens, output_tokens=counted.output_tokens,
                     compute_s=message.total_compute_s, cost=message.total_cost)
    return CostReport(group_by=message.group_by, rows=lines, total=total,
                      spooled_events=message.spooled_events, dropped_events=message.dropped_events)
