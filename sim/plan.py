"""``cmesh plan``: predict a mesh's cost and latency on a workload, and search for
the cheapest per-model settings that meet an SLO.

The prediction is one simulated run (``sim.mesh.simulate``) of the mesh.yaml as
it is. The search (``--slo``) moves one model's ``target_concurrency`` (×0.75
or ×1.33) or ``min_replicas`` (±1) at a time: while the SLO is missed it takes
the move that lowers the worst target's P95 the most per unit of added cost;
once it is met, the move that saves the most and still meets it; it stops when
no move helps (or after ``max_runs`` simulations). Deterministic for a seed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import yaml

from cmesh.config import MeshConfig
from sim.mesh import SimOptions, SimResult, simulate
from sim.profiles import Profiles
from sim.workload import Workload


def table(result: SimResult) -> str:
    """Per model and per target: replica-seconds, cost, latency, peaks, drops."""
    lines = [f"strategy {result.strategy} on {result.workload}: {result.requests:,} requests, "
             f"{result.duration_s:,.0f} simulated s ({result.events:,} events, "
             f"{result.events / max(result.wall_s, 1e-9):,.0f} events/s)", "",
             f"{'model':<18} {'replica-s':>11} {'cost':>10} {'peak':>5} {'calls':>9} {'P50 ms':>9} "
             f"{'P95 ms':>9} {'P99 ms':>9}"]
    f = lambda v: "-" if v is None else f"{v:,.1f}"   # noqa: E731
    for m, d in result.by_model.items():
        lines.append(f"{m:<18} {d['replica_s']:>11,.1f} {d['cost']:>10.4f} {d['peak_replicas']:>5} {d['calls']:>9,} "
                     f"{f(d['p50_ms']):>9} {f(d['p95_ms']):>9} {f(d['p99_ms']):>9}")
    lines += ["", f"{'target|class':<38} {'requests':>9} {'drops':>7} {'P50 ms':>9} {'P95 ms':>9} {'P99 ms':>9}"]
    for k, d in result.by_target.items():
        lines.append(f"{k:<38} {d['requests']:>9,} {d['failed']:>7,} {f(d.get('p50_ms')):>9} "
                     f"{f(d.get('p95_ms')):>9} {f(d.get('p99_ms')):>9}")
    t = result.totals
    lines += ["", f"total: replica-s {t['replica_s']:,.1f}, cost {t['cost']:.4f}, P95 {f(t['p95_ms'])} ms, "
                  f"drops {t['drops']:,} ({', '.join(f'{k} {v}' for k, v in result.outcomes.items() if k.startswith('failed')) or 'none'})"]
    return "\n".join(lines)


@dataclass
class SLO:
    p95_ms: float
    targets: tuple[str, ...] = ()      # "pipeline:support-agent|interactive" keys; empty: every interactive one
    max_drop_fraction: float = 0.001

    def worst(self, r: SimResult) -> float:
        """Worst P95 over the SLO's targets, over the SLO (<= 1 means met); drops count as misses."""
        keys = self.targets or tuple(k for k in r.by_target if k.endswith("|interactive"))
        worst = 0.0
        for k in keys:
            d = r.by_target.get(k)
            if not d:
                continue
            if d["requests"] and d["failed"] / d["requests"] > self.max_drop_fraction:
                return float("inf")
            worst = max(worst, (d.get("p95_ms") or float("inf")) / self.p95_ms)
        return worst

    def met(self, r: SimResult) -> bool:
        return self.worst(r) <= 1.0


def _with(config: MeshConfig, model: str, **deployment) -> MeshConfig:
    c = config.model_copy(deep=True)
    spec = c.models[model].deployment
    for k, v in deployment.items():
        setattr(spec, k, v)
    return c


def _moves(config: MeshConfig, up: bool) -> list[tuple[str, dict]]:
    moves = []
    for m, spec in config.models.items():
        d = spec.deployment
        if d.mode == "dedicated":
            continue
        if up:
            moves.append((m, {"target_concurrency": round(d.target_concurrency * 0.75, 4)}))
            if d.min_replicas < d.max_replicas:
                moves.append((m, {"min_replicas": d.min_replicas + 1}))
        else:
            moves.append((m, {"target_concurrency": round(d.target_concurrency * 4 / 3, 4)}))
            if d.min_replicas > 0:
                moves.append((m, {"min_replicas": d.min_replicas - 1}))
    return moves


def search(config: MeshConfig, profiles: Profiles, workload: Workload, slo: SLO, options: SimOptions,
           *, max_runs: int = 40, log: Callable[[str], None] | None = None) -> tuple[MeshConfig, SimResult, int]:
    """The cheapest settings found that meet ``slo`` (or the closest, if none does)."""
    runs = 0

    def run(c: MeshConfig) -> SimResult:
        nonlocal runs
        runs += 1
        return simulate(c, profiles, workload, replace(options, strategy="permodel"))

    best_c, best = config, run(config)
    while runs < max_runs:
        met = slo.met(best)
        if log:
            log(f"run {runs}: cost {best.cost:.4f}, worst P95/SLO {slo.worst(best):.2f} ({'met' if met else 'missed'})")
        candidates = []
        for model, change in _moves(best_c, up=not met):
            if runs >= max_runs:
                break
            c = _with(best_c, model, **change)
            r = run(c)
            candidates.append((c, r, model, change))
        if not candidates:
            break
        if not met:
            def gain(item):
                _, r, _, _ = item
                worse = slo.worst(r)
                extra = max(r.cost - best.cost, 1e-9)
                return (slo.met(r), (slo.worst(best) - worse) / extra if worse < slo.worst(best) else -1.0, -r.cost)
            c, r, model, change = max(candidates, key=gain)
            if slo.worst(r) >= slo.worst(best) and not slo.met(r):
                break
        else:
            ok = [x for x in candidates if slo.met(x[1]) and x[1].cost < best.cost]
            if not ok:
                break
            c, r, model, change = min(ok, key=lambda x: x[1].cost)
        if log:
            log(f"  {model}: {change}")
        best_c, best = c, r
    return best_c, best, runs


def fragment(config: MeshConfig, original: MeshConfig) -> str:
    """The changed per-model settings as a mesh.yaml fragment."""
    out: dict = {"models": {}}
    for m, spec in config.models.items():
        d, o = spec.deployment, original.models[m].deployment
        changed = {k: getattr(d, k) for k in ("target_concurrency", "min_replicas")
                   if getattr(d, k) != getattr(o, k)}
        if changed:
            out["models"][m] = {"deployment": changed}
    if not out["models"]:
        return "# no change: the current settings are the cheapest found that meet the SLO\n"
    return yaml.safe_dump(out, sort_keys=False)
