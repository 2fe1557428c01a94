"""Static vs uniform vs per-model scaling, and independent vs coordinated warming.

    python -m loadtest.experiments [--quick] [--scenarios spike10x,steady] [--out results/experiments]

For each scenario, the mesh (autoscaler + router; model servers from the local
provider) is started three times, once per deployment strategy
(``loadtest.experiment_plan``), warmed until every model has a ready replica, and
the same open-loop schedule is replayed against it (``loadtest.replay``):

1. ``permodel``: this project's autoscaler, each model on its own load;
2. ``static``: every model fixed at the replica count it needed at the peak of
   run 1, always on;
3. ``uniform``: every model scaled together on the mesh's aggregate load.

Then the support-agent cold start from zero is measured with independent and
with coordinated warming (``loadtest.bench_coldstart``). Writes ``<out>/results.md``
(the table), ``<out>/results.json``, ``<out>/strategies.png`` and, per run, the
replay's summary, per-request records and plot under ``<out>/<scenario>/<strategy>/``.
Prints, last, one JSON object: the compared figures of the first scenario.

``--quick`` replays spike10x only, three times faster at the scenario's own
requests per second (compress 3, rate scale 1/3), within 10 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from loadtest.common import REPO, busy_seconds, cpu_seconds, emit, free_port, mesh_token, running_mesh
from loadtest.experiment_plan import (STRATEGIES, Outcome, base_config, headline, markdown, peak_counts,
                                      strategy_config)
from loadtest.scenario import load_scenario

SCENARIOS = REPO / "loadtest" / "scenarios"


async def warm_all(autoscaler: str, config: dict, timeout_s: float, internal_token: str | None = None) -> float:
    """Ask for every pipeline and model, then wait until each model's desired
    replicas are ready (at least one): the replay starts from a warm mesh, as a
    deployment that was already serving would be."""
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    started = time.monotonic()
    from cmesh.internal_auth import MeshCredentials, open_internal_channel

    async with open_internal_channel(autoscaler, MeshCredentials(token=internal_token)) as channel:
        stub = mesh_pb2_grpc.AutoscalerStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        for pipeline in config.get("pipelines", {}):
            await stub.Warm(mesh_pb2.WarmRequest(pipeline=pipeline, reason="experiment"), timeout=10)
        for model in config["models"]:
            await stub.Warm(mesh_pb2.WarmRequest(model=model, reason="experiment"), timeout=10)
        while time.monotonic() - started < timeout_s:
            status = await stub.Status(mesh_pb2.StatusRequest(), timeout=10)
            if all(sum(r.state == "ready" for r in m.replicas) >= max(1, m.desired_dedicated + m.desired_serverless)
                   for m in status.models):
                return time.monotonic() - started
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the mesh was not warm within {timeout_s:g} s")


def run_strategy(name: str, config: dict, scenario_path: Path, *, compress: float, rate_scale: float,
                 out: Path, log) -> dict:
    """One strategy on one scenario: start, warm, replay, stop. Returns the replay summary."""
    import uvloop

    from loadtest import replay

    scenario = load_scenario(scenario_path)
    token = mesh_token(config)
    pids: list[int] = []
    with running_mesh(config, log=log, internal_token=token, pids=pids) as (router, autoscaler):
        warm_s = uvloop.run(warm_all(autoscaler, config, timeout_s=240, internal_token=token))
        log(f"[{scenario.name}/{name}] mesh warm in {warm_s:.1f} s; replaying")
        options = replay.ReplayOptions(target=router, autoscaler=autoscaler, internal_token=token,
                                       compress=scenario.compress * compress, rate_scale=rate_scale,
                                       out=out / scenario.name / name, progress_s=15.0,
                                       log=lambda line: log(f"[{scenario.name}/{name}] {line}"))
        # The cores the mesh's own processes and the load generator take while the
        # replicas serve (sim.calibrate models them as the host's overhead).
        pids.append(os.getpid())
        cpu0, busy0, t0 = cpu_seconds(pids), busy_seconds(), time.monotonic()
        summary = uvloop.run(replay.run(options, scenario))
        cpu1, busy1, t1 = cpu_seconds(pids), busy_seconds(), time.monotonic()
    per_s = lambda a, b: round((b - a) / (t1 - t0), 3) if a is not None and b is not None else None   # noqa: E731
    summary["overhead_cores"], summary["busy_cores"] = per_s(cpu0, cpu1), per_s(busy0, busy1)
    log(f"[{scenario.name}/{name}] the machine was busy {summary['busy_cores']} cores, the router, "
        f"autoscaler and load generator {summary['overhead_cores']} of them")
    for line in replay.report(summary, options.out):
        log(f"[{scenario.name}/{name}] {line}")
    return summary


def coldstart(store: Path, log) -> dict:
    from loadtest.bench_coldstart import measure

    independent, ind = measure(store, coordinated=False, port=free_port())
    log(f"[coldstart] independent warming: first answer after {independent:.2f} s; load times {ind}")
    coordinated, co = measure(store, coordinated=True, port=free_port())
    log(f"[coldstart] coordinated warming: first answer after {coordinated:.2f} s; load times {co}")
    return {"independent_s": round(independent, 3), "coordinated_s": round(coordinated, 3),
            "ratio": round(coordinated / independent, 3), "load_times_independent_s": ind,
            "load_times_coordinated_s": co}


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Per scenario: total ready replicas over time for each strategy, and P95 vs cost."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 2, squeeze=False)
    for row, (scenario, summaries) in enumerate(results.items()):
        ax_t, ax_b = axes[row]
        for name, summary in summaries.items():
            timeline = summary["replicas"]["timeline"]
            ax_t.step([t for t, _ in timeline], [sum(r.values()) for _, r in timeline], where="post", label=name)
        ax_t.set_title(f"{scenario}: ready replicas, all models")
        ax_t.set_xlabel("wall seconds since the replay started")
        ax_t.set_ylim(bottom=0)
        ax_t.legend()
        names = list(summaries)
        p95 = [summaries[n]["totals"]["p95_ms"] or 0 for n in names]
        cost = [sum(summaries[n]["replica_seconds"].values()) for n in names]
        ax_b.bar([i - 0.2 for i in range(len(names))], p95, width=0.4, color="tab:blue", label="P95 ms")
        ax_b.set_ylabel("P95 latency (ms)", color="tab:blue")
        ax_c = ax_b.twinx()
        ax_c.bar([i + 0.2 for i in range(len(names))], cost, width=0.4, color="tab:orange", label="replica-s")
        ax_c.set_ylabel("ready replica-seconds", color="tab:orange")
        ax_b.set_xticks(range(len(names)), names)
        ax_b.set_title(f"{scenario}: P95 (blue) and cost (orange) per strategy")
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.experiments", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="spike10x only, 3x faster (within 10 minutes)")
    p.add_argument("--scenarios", default=None, metavar="A,B",
                   help="scenario names under loadtest/scenarios (default: spike10x,steady,cv2x,diurnal; "
                        "--quick: spike10x)")
    p.add_argument("--compress", type=float, default=None, metavar="X",
                   help="extra time compression on top of each scenario's own (default 1; --quick 3)")
    p.add_argument("--rate-scale", type=float, default=None, metavar="F",
                   help="multiply every rate by F (default 1 / compress: the scenario's requests per second)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), metavar="A,B",
                   help="strategies to run (static needs permodel before it)")
    p.add_argument("--no-coldstart", action="store_true", help="skip the independent vs coordinated comparison")
    p.add_argument("--store", default=".cmesh/store", help="demo model store (bootstrapped if needed)")
    p.add_argument("--out", default="results/experiments", help="output directory")
    args = p.parse_args(argv)
    args.compress = args.compress or (3.0 if args.quick else 1.0)
    args.rate_scale = args.rate_scale or 1.0 / args.compress
    if args.compress <= 0 or args.rate_scale <= 0:
        p.error("--compress and --rate-scale must be > 0")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if any(s not in STRATEGIES for s in args.strategies) or (
            "static" in args.strategies and "permodel" not in args.strategies):
        p.error(f"--strategies: a subset of {','.join(STRATEGIES)}; static needs permodel")
    names = args.scenarios or ("spike10x" if args.quick else "spike10x,steady,cv2x,diurnal")
    args.scenario_paths = [SCENARIOS / f"{n.strip()}.yaml" for n in names.split(",") if n.strip()]
    for path in args.scenario_paths:
        if not path.exists():
            p.error(f"--scenarios: no scenario {path.stem!r} in {SCENARIOS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from demo_store import bootstrap

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.monotonic()
    store = Path(args.store).resolve()
    bootstrap(store, progress=log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    summaries: dict[str, dict[str, dict]] = {}
    outcomes: dict[str, dict[str, Outcome]] = {}
    for path in args.scenario_paths:
        port = free_port()
        base = base_config(demo, str(store), f"127.0.0.1:{port}", args.compress)
        runs: dict[str, dict] = {}
        for name in [s for s in STRATEGIES if s in args.strategies]:   # permodel first: static is sized from its peak
            static = peak_counts(runs["permodel"]["replicas"]["max_ready"], list(base["models"])) \
                if name == "static" else None
            if static:
                log(f"[{path.stem}/static] fixed replicas (the per-model run's peak): {static}")
            runs[name] = run_strategy(name, strategy_config(base, name, static), path, compress=args.compress,
                                      rate_scale=args.rate_scale, out=out, log=log)
        summaries[path.stem] = runs
        outcomes[path.stem] = {n: Outcome.of(n, s) for n, s in runs.items()}
    cold = None if args.no_coldstart else coldstart(store, log)
    meta = {"compress": args.compress, "rate_scale": args.rate_scale, "quick": args.quick,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
            "elapsed_s": round(time.monotonic() - started, 1)}
    (out / "results.md").write_text(markdown(outcomes, cold, meta))
    heads = {s: headline(o) for s, o in outcomes.items()}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "headline": heads, "coldstart": cold,
         "outcomes": {s: {n: asdict(o) for n, o in os_.items()} for s, os_ in outcomes.items()}}, indent=2) + "\n")
    plot(summaries, out / "strategies.png")
    log((out / "results.md").read_text())
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'strategies.png'} "
        f"in {meta['elapsed_s']:.0f} s")
    first = heads[args.scenario_paths[0].stem]
    if cold:
        first = {**first, "coldstart_independent_s": cold["independent_s"],
                 "coldstart_coordinated_s": cold["coordinated_s"], "coldstart_ratio": cold["ratio"]}
    emit({**first, "compress": args.compress, "rate_scale": round(args.rate_scale, 4),
          "elapsed_s": meta["elapsed_s"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
