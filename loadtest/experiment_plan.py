"""The experiments' pure parts: one mesh config per deployment strategy, and the results.

``loadtest.experiments`` is the I/O around this module (it starts the mesh, warms it
and replays). Strategies:

* ``static``: every model a fixed dedicated pool sized for the peak, always on;
* ``uniform``: every model scaled together on the mesh's aggregate load
  (``autoscaler.strategy: uniform``), the way a monolith or a pipeline deployed
  as one unit scales;
* ``permodel``: this project's autoscaler, each model on its own load.

All three share one deployment profile (the same target concurrency and maximum
per model, the same windows), so they differ only in *how* replica counts are
chosen. The profile's time constants are in scenario seconds and shrink with
the replay's time compression, so a compressed run scales the way the full-length
one would.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

STRATEGIES = ("permodel", "static", "uniform")

# Per model: (target concurrency, max replicas). The demo's production targets
# (8 to 32 in flight per replica) assume GPU-sized traffic. At this machine's few
# requests per second the embedder and the two LLMs carry most of the work: their
# targets are set so the base load fits one replica and a ten-fold burst needs
# several. The classifier, the vector index and the SQL tool take a few
# milliseconds a call, so one replica carries even the burst (as it would on a GPU
# node); they may still scale to two.
PROFILE: dict[str, tuple[float, int]] = {
    "embedder": (0.5, 4),
    "intent-classifier": (1.0, 2),
    "kb-index": (1.0, 2),
    "sql-executor": (1.0, 2),
    "dialogue-llm": (0.15, 4),
    "code-llm": (0.5, 2),
}
DEFAULT_PROFILE = (1.0, 3)

# Autoscaler time constants in scenario seconds (divided by the compression).
STABLE_WINDOW_S = 30.0
PANIC_WINDOW_S = 6.0
SCALE_DOWN_DELAY_S = 15.0
IDLE_TIMEOUT_S = 60.0
MIN_PANIC_WINDOW_S = 3.0        # wall seconds: a few reports, not one Poisson clump


def base_config(demo: dict, store: str, autoscaler: str, compress: float) -> dict:
    """The demo mesh for an experiment: its models and pipelines, no auth (the
    experiment measures scaling), and the shared profile with compressed windows."""
    data = copy.deepcopy(demo)
    data["store"] = store
    data.pop("tenants", None)
    data.pop("schedules", None)
    data.setdefault("security", {}).pop("admin_keys_env", None)
    stable = STABLE_WINDOW_S / compress
    data["autoscaler"] = {
        "listen": autoscaler, "tick_s": 0.5, "stable_window_s": stable,
        "panic_window_s": min(stable, max(MIN_PANIC_WINDOW_S, PANIC_WINDOW_S / compress)),
        "scale_down_delay_s": SCALE_DOWN_DELAY_S / compress, "stale_after_s": 5.0,
        "drain_grace_s": 10.0,
    }
    data["router"] = {"autoscaler": autoscaler, "hold_timeout_s": 60}
    for name, spec in data["models"].items():
        target, top = PROFILE.get(name, DEFAULT_PROFILE)
        spec["deployment"] = {"mode": "serverless", "min_replicas": 0, "max_replicas": top,
                              "target_concurrency": target, "idle_timeout_s": IDLE_TIMEOUT_S / compress,
                              "max_inflight_per_replica": 64}
        # One intra-op thread a replica: replicas are the unit of parallelism here,
        # and several 2-thread replicas on 2 cores would fight over them.
        spec.setdefault("resources", {})["torch_threads"] = 1
    return data


def strategy_config(base: dict, strategy: str, static_counts: dict[str, int] | None = None) -> dict:
    """``base`` deployed the way ``strategy`` says; ``static`` needs the peak counts."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    data = copy.deepcopy(base)
    if strategy == "uniform":
        data["autoscaler"]["strategy"] = "uniform"
    elif strategy == "static":
        if static_counts is None:
            raise ValueError("static_counts: the static strategy needs a replica count per model")
        for name, spec in data["models"].items():
            n = max(1, static_counts.get(name, 1))
            spec["deployment"] = {**spec["deployment"], "mode": "dedicated", "dedicated_replicas": n,
                                  "max_replicas": max(n, spec["deployment"]["max_replicas"])}
    return data


def peak_counts(max_ready: dict[str, int], models: list[str]) -> dict[str, int]:
    """Static sizing: each model at the most replicas it needed at the peak (what the
    per-model autoscaler reached on the same traffic), at least one."""
    return {m: max(1, int(max_ready.get(m, 0))) for m in models}


@dataclass
class Outcome:
    """One strategy's replay, reduced to the compared numbers."""

    strategy: str
    scenario: str
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    throughput_rps: float | None
    requests: int
    ok: int
    drops: int                      # not answered OK: client drops and error answers
    replica_s: float                # ready replica-seconds over the replay (wall)
    replica_s_by_model: dict[str, float] = field(default_factory=dict)
    max_ready: dict[str, int] = field(default_factory=dict)
    p95_by_class: dict[str, float | None] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    # CPU the router, autoscaler and load generator used over the replay, in
    # cores (None: not measured); sim.calibrate's host overhead.
    overhead_cores: float | None = None
    busy_cores: float | None = None   # the whole machine's CPU over the replay, in cores

    @classmethod
    def of(cls, strategy: str, summary: dict) -> "Outcome":
        t = summary["totals"]
        by_model = summary["replica_seconds"]
        return cls(strategy=strategy, scenario=t["scenario"], p50_ms=t["p50_ms"], p95_ms=t["p95_ms"],
                   p99_ms=t["p99_ms"], throughput_rps=t["throughput_rps"], requests=t["requests"], ok=t["ok"],
                   drops=t["requests"] - t["ok"], replica_s=round(sum(by_model.values()), 3),
                   replica_s_by_model=dict(by_model), max_ready=dict(summary["replicas"]["max_ready"]),
                   p95_by_class={k: g["p95_ms"] for k, g in summary["by_latency_class"].items()},
                   errors_by_code=dict(t["errors_by_code"]), overhead_cores=summary.get("overhead_cores"),
                   busy_cores=summary.get("busy_cores"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def headline(outcomes: dict[str, Outcome]) -> dict:
    """The compared figures of one scenario (the keys the issue asks for); None
    where a strategy was not run."""
    s, p, u = (outcomes.get(n) for n in ("static", "permodel", "uniform"))

    def get(o: Outcome | None, attr: str):
        return getattr(o, attr) if o is not None else None

    return {
        "scenario": next(iter(outcomes.values())).scenario,
        "static_p95_ms": get(s, "p95_ms"), "permodel_p95_ms": get(p, "p95_ms"), "uniform_p95_ms": get(u, "p95_ms"),
        "static_replica_s": get(s, "replica_s"), "permodel_replica_s": get(p, "replica_s"),
        "uniform_replica_s": get(u, "replica_s"),
        "permodel_cost_ratio": _ratio(get(p, "replica_s"), get(s, "replica_s")),
        "uniform_cost_ratio": _ratio(get(u, "replica_s"), get(s, "replica_s")),
        "permodel_p95_over_static": _ratio(get(p, "p95_ms"), get(s, "p95_ms")),
        "uniform_p95_over_static": _ratio(get(u, "p95_ms"), get(s, "p95_ms")),
        "drops": sum(o.drops for o in outcomes.values()),
        "requests": {k: o.requests for k, o in outcomes.items()},
    }


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def markdown(results: dict[str, dict[str, Outcome]], coldstart: dict | None, meta: dict) -> str:
    """The results table (one row per scenario and strategy) and the cold-start comparison."""
    lines = ["# Deployment strategies compared", "",
             f"Machine: {meta.get('machine', '?')}. Time compression {meta['compress']:g}, rate scale "
             f"{meta['rate_scale']:g} (requests per wall second as in the scenario file when their product is 1). "
             "Latency: from each request's scheduled send time to its answer, OK answers only. Cost: ready "
             "replica-seconds over the replay (wall). Drops: requests not answered OK.", "",
             "| scenario | strategy | P50 ms | P95 ms | P99 ms | throughput req/s | replica-s | cost vs static "
             "| drops | peak replicas |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for scenario, outcomes in results.items():
        static = outcomes.get("static")
        for name in STRATEGIES:
            o = outcomes.get(name)
            if o is None:
                continue
            peak = ", ".join(f"{m} {n}" for m, n in sorted(o.max_ready.items()))
            cost = _ratio(o.replica_s, static.replica_s) if static else None
            lines.append(f"| {scenario} | {name} | {_fmt(o.p50_ms)} | {_fmt(o.p95_ms)} | {_fmt(o.p99_ms)} | "
                         f"{_fmt(o.throughput_rps, 2)} | {_fmt(o.replica_s)} | {_fmt(cost, 2)} | {o.drops} | "
                         f"{peak} |")
    if coldstart:
        lines += ["", "## Cold start of support-agent from zero replicas", "",
                  "| warming | first complete answer (s) |", "|---|---:|",
                  f"| independent (each model when first touched) | {coldstart['independent_s']:.2f} |",
                  f"| coordinated (the whole pipeline at the first touch) | {coldstart['coordinated_s']:.2f} |",
                  "", f"Ratio coordinated / independent: {coldstart['ratio']:.2f}."]
    return "\n".join(lines) + "\n"

