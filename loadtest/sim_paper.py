"""The paper's evaluation at the paper's scale, simulated with the mesh's own policies.

    python -m loadtest.sim_paper [--scale 1.0] [--out results/sim]

Paper profiles (``sim/profiles/paper.yaml``), the support-agent graph of
``compose/mesh.yaml`` deployed for GPUs (``PAPER_DEPLOYMENT``), and the replay
scenarios rate-scaled so that spike10x peaks at 2,250 requests per second
(``--scale`` multiplies that: 0.1 runs the same at a tenth). Writes
``<out>/results.json``, ``<out>/results.md`` and ``<out>/spike_replicas.png``
(per-model vs uniform replicas over the spike). Prints one JSON object last:
coldstart_ratio, permodel_cost_vs_static (diurnal: against the cheapest static
deployment at least as fast, ``equal_p95_static``; ``..._at_peak``: against
static at per-model's peak counts), spike_p95_over_steady, scale_factors,
uniform_overprovision, tiered_cost_share, tiered_delay_removed,
cv2x_p95_within_1_5x, graph_ahead_within_1_5x, permodel_within_1_5x,
graph_ahead_replica_s_ratio, events_per_s.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import yaml

from cmesh.config import MeshConfig, parse_config
from loadtest.common import REPO, emit
from loadtest.experiment_plan import peak_counts
from loadtest.scenario import load_scenario
from sim.mesh import SimOptions, SimResult, simulate
from sim.profiles import load_profiles
from sim.workload import Stream, Workload, from_scenario

SCENARIOS = REPO / "loadtest" / "scenarios"
PEAK_RPS = 2250.0
PIPE = "pipeline:support-agent|interactive"
# model -> (target_concurrency, max_replicas, max_inflight_per_replica): GPU replicas
PAPER_DEPLOYMENT = {"embedder": (32, 64, 128), "intent-classifier": (48, 32, 256), "kb-index": (32, 32, 128),
                    "sql-executor": (8, 64, 16), "dialogue-llm": (24, 1200, 32), "code-llm": (24, 200, 32)}


def paper_config() -> MeshConfig:
    data = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    data.pop("schedules", None)
    data.pop("tenants", None)
    data.setdefault("security", {}).pop("admin_keys_env", None)
    data["devices"] = [{"name": "gpu-fleet", "kind": "cpu", "memory_mb": 10**9}]   # capacity is not the limit here
    # Step-wise scale-down (halve at most, one step per stable window): an LLM's
    # concurrency grows with its batch, so one jump down to what a large pool
    # measured undershoots, queues and cold-starts back up (diurnal P95 28 s
    # without it, 5.8 s with it, at 1.5 % fewer replica-seconds).
    # Trend-ahead scale-up (autoscaler.trend): a ramp's arrival-rate slope
    # projected one measured cold start ahead, so the LLM's replicas (150 s to
    # start) are asked for before the ramp's load arrives rather than after
    # (diurnal P95 5.8 s -> 4.9 s, deadline drops 4,848 -> 2,842).
    data["autoscaler"] = {"stable_window_s": 60, "panic_window_s": 6, "scale_down_delay_s": 60, "tick_s": 1,
                          "max_scale_down_rate": 2.0, "trend_ahead": True}
    data["router"] = {"max_queue_per_model": 20000, "max_held_per_model": 20000, "hold_timeout_s": 60}
    for m, (target, top, cap) in PAPER_DEPLOYMENT.items():
        data["models"][m]["deployment"] = {"mode": "serverless", "min_replicas": 0, "max_replicas": top,
                                           "target_concurrency": target, "max_inflight_per_replica": cap,
                                           "idle_timeout_s": 900}
    return parse_config(data, "paper mesh")


# The replay compresses diurnal's scenario hour 12x more (5 wall minutes) for a real
# mesh whose replicas start in seconds. With the paper's cold starts (the LLM:
# 150 s) a 12x day has 37 s ramps that no reactive autoscaler can follow, so the
# simulation runs the scenario hour as written: one hour per day, 7.5 min ramps.
DIURNAL_COMPRESS = 1.0
SPIKE = (120.0, 180.0)           # spike10x's burst (scenario seconds)
IDLE_S = 900.0                   # §4.2: the first request after 15 minutes of inactivity


def compress_of(sc) -> float:
    return DIURNAL_COMPRESS if sc.name == "diurnal" else sc.compress


def rate_scale(name: str, scale: float) -> float:
    """spike10x peaks at PEAK_RPS x scale and steady/cv2x get its per-class rates;
    diurnal (at ``DIURNAL_COMPRESS``) peaks at PEAK_RPS x scale as well."""
    from loadtest.scenario import class_pieces

    if name == "diurnal":
        sc = load_scenario(SCENARIOS / "diurnal.yaml")
        peak = sum(c.rate_per_s * class_pieces(sc, c).peak for c in sc.classes) * compress_of(sc)
        return PEAK_RPS * scale / peak
    spike = load_scenario(SCENARIOS / "spike10x.yaml")
    peak = sum(c.rate_per_s for c in spike.classes) * 10.0
    return PEAK_RPS * scale / peak


def run(config, profiles, name: str, scale: float, log, **opts) -> SimResult:
    sc = load_scenario(SCENARIOS / f"{name}.yaml")
    wl = from_scenario(sc, compress=compress_of(sc), rate_scale=rate_scale(name, scale))
    opts.setdefault("prestart", base_replicas(config, sc, scale, profiles))
    opts.setdefault("warm_start", False)
    t = time.perf_counter()
    r = simulate(config, profiles, wl, SimOptions(**opts))
    log(f"[{name}/{r.strategy}{'/graph-ahead' if opts.get('graph_ahead') else ''}"
        f"{'/independent' if opts.get('coordinated') is False else ''}] {r.requests:,} requests, "
        f"P95 {r.by_target.get(PIPE, {}).get('p95_ms')} ms, replica-s {r.replica_s:,.0f}, drops {r.totals['drops']:,}, "
        f"{r.events:,} events in {time.perf_counter() - t:.0f} s")
    return r


def base_replicas(config: MeshConfig, sc, scale: float, profiles=None) -> dict[str, int]:
    """A mesh that was already serving the scenario's load at its start: per
    model, the replicas its concurrency then (Little: each class's rate at t = 0
    x the latency at the target batch) needs at its target concurrency."""
    from loadtest.scenario import rate_at

    profiles = profiles or load_profiles("paper")
    rs = rate_scale(sc.name, scale) * compress_of(sc)
    rate: dict[str, float] = {m: 0.0 for m in config.models}
    for c in sc.classes:
        models = ([n.model for n in config.pipelines[c.pipeline].nodes.values()] if c.pipeline else [c.model])
        for m in models:
            rate[m] += rate_at(sc, c, 0.0) * rs
    out = {}
    for m, r in rate.items():
        d = config.models[m].deployment
        latency = profiles.for_model(m).curve()(max(1, int(d.target_concurrency)))
        out[m] = max(1, math.ceil(r * latency / d.target_concurrency))
    return out


def after_idle(config: MeshConfig, profiles, *, coordinated: bool,
               provisioned: tuple[str, ...] = ()) -> tuple[float, float]:
    """§4.2: one support-agent request after ``IDLE_S`` of inactivity, every model
    at zero except ``provisioned`` (one replica each, ``min_replicas: 1``): the
    request's answer time (s) and the measured cost (replica-seconds x price,
    from the start of the idle period to the answer)."""
    c = config.model_copy(deep=True)
    c.router.hold_timeout_s = c.router.default_timeout_s = 900
    for m in provisioned:
        c.models[m].deployment.min_replicas = 1
    wl = Workload("coldstart", IDLE_S + 1.0, [Stream("one", "pipeline", "support-agent", "interactive",
                                                     np.asarray([IDLE_S]), np.asarray([0]),
                                                     ("Where is my order 1042?",))])
    r = simulate(c, profiles, wl, SimOptions(coordinated=coordinated, warm_start=False,
                                             prestart={m: 1 for m in provisioned}, tail_s=900))
    return (r.by_target[PIPE]["p50_ms"] or 0) / 1000.0, r.cost


def scale_factors(r: SimResult, spike: tuple[float, float] = SPIKE) -> dict[str, float]:
    """Per model: the most replicas the autoscaler held (starting or ready)
    during the spike over those it held in the 20 s before it."""
    base: dict[str, int] = {}
    peak: dict[str, int] = {}
    for t, counts in r.provisioned:
        for m in r.by_model:
            n = counts.get(m, 0)
            if spike[0] - 20.0 <= t < spike[0]:
                base[m] = max(base.get(m, 0), n)
            if spike[0] <= t <= spike[1]:
                peak[m] = max(peak.get(m, 0), n)
    return {m: round(peak.get(m, 0) / n, 2) for m, n in base.items() if n}


def equal_p95_static(go, name: str, per: SimResult, peak: dict[str, int], steps: int = 5
                     ) -> tuple[SimResult, float, SimResult]:
    """The cheapest static deployment at least as fast as per-model (P95 of
    support-agent no worse): per-model's peak counts, every model scaled by one
    factor, bisected ``steps`` times in (0, 1]. Static at the peak counts is
    what a platform provisions without measuring; sized at per-model's P95 it
    is the deployment per-model is compared with at equal P95 (the issue's
    ``permodel_cost_vs_static``). Returns that run, its factor (1.0: even the
    peak counts are slower than per-model) and the run at the peak counts."""
    target = per.by_target[PIPE]["p95_ms"]
    counts = lambda f: {m: max(1, round(n * f)) for m, n in peak.items()}   # noqa: E731
    at_peak = best = go(name, strategy="static", static_counts=peak)
    best_f = 1.0
    if best.by_target[PIPE]["p95_ms"] > target:
        return best, best_f, at_peak
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        f = (lo + hi) / 2
        r = go(name, strategy="static", static_counts=counts(f))
        if r.by_target[PIPE]["p95_ms"] <= target and r.totals["drops"] <= per.totals["drops"]:
            best, best_f, hi = r, f, f
        else:
            lo = f
    return best, best_f, at_peak


def speed(seconds: float, log) -> dict:
    """The speed figure: support-agent alone (its 4-5 node calls per request) at a
    constant PEAK_RPS for ``seconds`` of simulated time, on a mesh already sized
    for it; extrapolated to one simulated hour."""
    config, profiles = paper_config(), load_profiles("paper")
    rng = np.random.default_rng(1)
    n = int(rng.poisson(PEAK_RPS * seconds))
    texts = ("How do I reset my password?", "Where is my order 1042?", "What is the status of order 1007?",
             "Can I change the shipping address of my order?")
    wl = Workload("speed", seconds, [Stream("support", "pipeline", "support-agent", "interactive",
                                            np.sort(rng.uniform(0.0, seconds, n)), rng.integers(0, len(texts), n),
                                            texts)])
    pre = {}
    for m in config.models:
        calls = 0.0 if m == "code-llm" else (0.25 if m == "sql-executor" else 1.0)
        d = config.models[m].deployment
        pre[m] = max(1, math.ceil(PEAK_RPS * calls * profiles.for_model(m).curve()(int(d.target_concurrency))
                                  / d.target_concurrency))
    t = time.perf_counter()
    r = simulate(config, profiles, wl, SimOptions(prestart=pre, warm_start=False, tail_s=60))
    wall = time.perf_counter() - t
    calls = sum(d["calls"] for d in r.by_model.values())
    out = {"simulated_s": seconds, "rps": PEAK_RPS, "requests": r.requests, "node_calls": calls,
           "calls_per_request": round(calls / max(1, r.requests), 2), "events": r.events, "wall_s": round(wall, 1),
           "events_per_s": round(r.events / wall), "calls_per_s": round(calls / wall),
           "wall_min_per_simulated_hour": round(wall / seconds * 60.0, 1)}
    log(f"[speed] {out}")
    return out


def plot(per: SimResult, uni: SimResult, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    models = ["embedder", "dialogue-llm", "sql-executor", "intent-classifier"]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, r, title in ((axes[0], per, "per-model"), (axes[1], uni, "uniform")):
        for m in models:
            ax.step([t for t, _ in r.timeline], [c.get(m, 0) for _, c in r.timeline], where="post", label=m)
        ax.axvspan(120, 180, color="0.9")
        ax.set_title(f"{title}: ready replicas over spike10x")
        ax.set_xlabel("simulated s")
        ax.set_yscale("symlog")
    axes[0].set_ylabel("ready replicas")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.sim_paper", description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's 2,250 RPS peak (default 1)")
    p.add_argument("--out", default="results/sim")
    p.add_argument("--profiles", default="paper")
    p.add_argument("--speed", type=float, default=None, metavar="SECONDS",
                   help="only the speed figure: support-agent at 2,250 RPS for SECONDS simulated")
    args = p.parse_args(argv)
    log = lambda line: print(line, flush=True)   # noqa: E731
    if args.speed:
        emit(speed(args.speed, log))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config, profiles = paper_config(), load_profiles(args.profiles)
    events = wall = 0.0

    def go(name, **kw):
        nonlocal events, wall
        r = run(config, profiles, name, args.scale, log, **kw)
        events += r.events
        wall += r.wall_s
        return r

    def static_of(per: SimResult) -> dict[str, int]:
        return peak_counts({m: v["peak_replicas"] for m, v in per.by_model.items()}, list(config.models))

    steady = go("steady")
    # The reference: steady's P95 once the autoscaler has a full stable window of data.
    warm_up = config.autoscaler.stable_window_s
    ref = steady.intervals[PIPE].merged(start_s=warm_up).quantile(0.95)
    spike = {"permodel": go("spike10x")}
    spike["uniform"] = go("spike10x", strategy="uniform")
    spike["static"] = go("spike10x", strategy="static", static_counts=static_of(spike["permodel"]))
    spike_ga = go("spike10x", graph_ahead=True)
    cv = go("cv2x")
    cv_ind = go("cv2x", coordinated=False)
    cv_ga = go("cv2x", graph_ahead=True)
    diurnal = {"permodel": go("diurnal")}
    diurnal["static"], static_factor, diurnal["static-at-peak"] = equal_p95_static(
        go, "diurnal", diurnal["permodel"], static_of(diurnal["permodel"]))
    support = ("intent-classifier", "embedder", "kb-index", "sql-executor", "dialogue-llm")
    independent, _ = after_idle(config, profiles, coordinated=False)
    coordinated, _ = after_idle(config, profiles, coordinated=True)
    tier_llm, tier_cost = after_idle(config, profiles, coordinated=True, provisioned=("dialogue-llm",))
    _, all_cost = after_idle(config, profiles, coordinated=True, provisioned=support)
    within = lambda r: r.intervals[PIPE].within(ref)   # noqa: E731
    per, uni = spike["permodel"], spike["uniform"]
    dp, ds = diurnal["permodel"], diurnal["static"]
    p95 = lambda r: r.by_target[PIPE]["p95_ms"]   # noqa: E731
    headline = {
        "coldstart_ratio": round(coordinated / independent, 3),
        "coldstart_independent_s": round(independent, 1), "coldstart_coordinated_s": round(coordinated, 1),
        "permodel_cost_vs_static": round(dp.cost / ds.cost, 3),
        "permodel_p95_vs_static_diurnal": round(p95(dp) / p95(ds), 3),
        "static_equal_p95_factor": static_factor,
        "permodel_cost_vs_static_at_peak": round(dp.cost / diurnal["static-at-peak"].cost, 3),
        "permodel_p95_vs_static_at_peak": round(p95(dp) / p95(diurnal["static-at-peak"]), 3),
        "spike_p95_over_steady": round(p95(per) / ref, 3),
        "static_spike_p95_over_steady": round(p95(spike["static"]) / ref, 3),
        "scale_factors": scale_factors(per),
        "uniform_overprovision": {m: round(uni.by_model[m]["replica_s"] / per.by_model[m]["replica_s"], 2)
                                  for m in per.by_model if per.by_model[m]["replica_s"]},
        "tiered_cost_share": round(tier_cost / all_cost, 3),
        "tiered_delay_removed": round(1 - tier_llm / coordinated, 3),
        "cv2x_p95_within_1_5x": {"coordinated": within(cv), "independent": within(cv_ind)},
        "graph_ahead_within_1_5x": {"cv2x": within(cv_ga), "spike10x": within(spike_ga)},
        "permodel_within_1_5x": {"cv2x": within(cv), "spike10x": within(per)},
        "graph_ahead_replica_s_ratio": {"cv2x": round(cv_ga.replica_s / cv.replica_s, 3),
                                        "spike10x": round(spike_ga.replica_s / per.replica_s, 3)},
        "steady_p95_ms": round(ref, 1), "peak_rps": PEAK_RPS * args.scale, "diurnal_compress": DIURNAL_COMPRESS,
        "simulated_s": round(sum(r.duration_s for r in (steady, *spike.values(), spike_ga, cv, cv_ind, cv_ga,
                                                        *diurnal.values()))),
        "events_per_s": round(events / wall) if wall else None, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    runs = {"steady": steady, **{f"spike10x/{k}": v for k, v in spike.items()}, "spike10x/graph-ahead": spike_ga,
            "cv2x": cv, "cv2x/independent": cv_ind, "cv2x/graph-ahead": cv_ga,
            **{f"diurnal/{k}": v for k, v in diurnal.items()}}
    (out / "results.json").write_text(json.dumps({"headline": headline,
                                                  "runs": {k: v.to_dict() for k, v in runs.items()}}, indent=2))
    lines = ["# The paper's evaluation, simulated", "", f"Peak {PEAK_RPS * args.scale:,.0f} RPS; paper profiles.", "",
             "| run | requests | P95 ms (support-agent) | replica-s | cost | drops |", "|---|---:|---:|---:|---:|---:|"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r.requests:,} | {p95(r)} | {r.replica_s:,.0f} | {r.cost:.3f} | {r.totals['drops']:,} |")
    lines += ["", "```json", json.dumps(headline, indent=2), "```"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(per, uni, out / "spike_replicas.png")
    emit(headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
