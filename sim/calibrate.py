"""Calibration: the simulator against a real ``loadtest.experiments`` run on this machine.

    python -m sim.calibrate --write-config /tmp/exp-mesh.yaml          # 1. the experiment's mesh
    cmesh profile --config /tmp/exp-mesh.yaml --scenario loadtest/scenarios/spike10x.yaml \
        --cores 2 --out /tmp/here.yaml                                   # 2. profiles measured here
    python -m loadtest.experiments --quick                             # 3. the real run
    python -m sim.calibrate --experiment results/experiments/results.json --profiles /tmp/here.yaml

Step 4 rebuilds each experiment run exactly as ``loadtest.experiments`` built it
(``loadtest.experiment_plan.base_config`` and ``strategy_config`` on
``compose/mesh.yaml``, static sized from the real per-model run's peaks; the
scenario at the run's compression and rate scale; the mesh warmed first),
simulates it with the profiles, and compares per strategy: replica-seconds
within ±15 % and P95 within ±30 % of the real run. Prints a table and one
JSON object last (``pass`` true when every strategy is within both bounds).

CPU sharing: on this 2-core machine every replica, the router, the
autoscaler and the load generator share the cores. The profiles' ``host``
section models it (``sim.profiles``, ``sim.replicas.Host``): ``cores``
(measured: the CPU count) less ``overhead_cores`` for the non-replica
processes, shared between the computing replicas by processor sharing.
``loadtest.experiments`` records, over each replay, how busy the whole
machine was (``busy_cores``) and what the router, the autoscaler and the load
generator used (``overhead_cores``). Each strategy is simulated with the
overhead at which the simulated machine is as busy as the real one was
(``fit_overhead``: measured busy cores less what the simulated replicas
computed); the overhead is thus fitted to CPU use, and the comparison is on
latency and replica-seconds. Without ``busy_cores`` the measured
``overhead_cores`` is used; ``--overhead-cores`` overrides both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cmesh.config import MeshConfig, parse_config
from loadtest.common import REPO, emit
from loadtest.experiment_plan import base_config, peak_counts
from loadtest.scenario import load_scenario
from sim.mesh import SimOptions, simulate
from sim.profiles import Profiles, load_profiles
from sim.workload import from_scenario

SCENARIOS = REPO / "loadtest" / "scenarios"
REPLICA_S_TOL = 0.15
P95_TOL = 0.30


def experiment_config(compress: float) -> MeshConfig:
    demo = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
    return parse_config(base_config(demo, str(REPO / ".cmesh" / "store"), "127.0.0.1:8500", compress),
                        "experiment mesh")


def _host_of(profiles: Profiles, override: float | None, measured: float | None) -> Profiles:
    """The profiles with the host overhead to simulate: ``override``, else what the
    real run measured, else the profiles' own (a new object; none is mutated)."""
    cores = override if override is not None else measured
    if cores is None or profiles.host.cores is None:
        return profiles
    cores = min(cores, profiles.host.cores * 0.95)     # a host with no core left is not one
    return profiles.model_copy(update={"host": profiles.host.model_copy(update={"overhead_cores": cores})})


def fit_overhead(config: MeshConfig, profiles: Profiles, workload, opts: SimOptions, busy_cores: float, *,
                 start: float = 0.0, rounds: int = 6):
    """The host overhead at which the simulated machine is as busy as the real
    one was: ``busy_cores`` (the whole machine over the real replay) less what
    the simulated replicas computed. The rest is CPU the simulated replicas do
    not spend, whoever spent it: the router, the autoscaler, the load generator
    (``start``: what they measured) and every replica's own work outside its
    batches (gRPC, batching, reports). Iterated (damped), since the replicas'
    compute depends on it through their batch sizes. Fitted to CPU use, not to
    latency or replica-seconds, which it is then compared on."""
    overhead, cores = start, profiles.host.cores
    for _ in range(rounds):
        used = _host_of(profiles, overhead, None)
        r = simulate(config, used, workload, opts)
        compute = r.cpu_cores or 0.0
        target = min(max(0.0, busy_cores - compute), cores * 0.95)
        if abs(target - overhead) < 0.01:
            break
        overhead = 0.3 * overhead + 0.7 * target
    return used, r, "fitted to the machine's busy cores"


def compare(experiment: dict, profiles: Profiles, *, seed: int = 0, overhead_cores: float | None = None,
            log=None) -> dict:
    """Per scenario and strategy: real vs simulated replica-seconds and P95. The
    host's overhead is ``overhead_cores`` when given; else fitted to the real
    run's ``busy_cores`` (``fit_overhead``); else what its router, autoscaler
    and load generator used (its ``overhead_cores``); else the profiles' own."""
    meta = experiment["meta"]
    compress, rscale = float(meta["compress"]), float(meta["rate_scale"])
    config = experiment_config(compress)
    rows = []
    for scenario, runs in experiment["outcomes"].items():
        sc = load_scenario(SCENARIOS / f"{scenario}.yaml")
        workload = from_scenario(sc, compress=sc.compress * compress, rate_scale=rscale)
        static = None
        if "permodel" in runs:
            static = peak_counts(runs["permodel"].get("max_ready", {}), list(config.models))
        for strategy, real in runs.items():
            opts = SimOptions(strategy=strategy, seed=seed, static_counts=static if strategy == "static" else None)
            if overhead_cores is None and real.get("busy_cores") and profiles.host.cores is not None:
                used, r, how = fit_overhead(config, profiles, workload, opts, real["busy_cores"],
                                            start=real.get("overhead_cores") or 0.0)
            else:
                used = _host_of(profiles, overhead_cores, real.get("overhead_cores"))
                r = simulate(config, used, workload, opts)
                how = ("given" if overhead_cores is not None else
                       "measured" if real.get("overhead_cores") is not None else "the profiles'")
            sim_p95 = r.totals["p95_ms"]
            row = {"scenario": scenario, "strategy": strategy,
                   "real_replica_s": real["replica_s"], "sim_replica_s": r.totals["replica_s"],
                   "real_p95_ms": real["p95_ms"], "sim_p95_ms": sim_p95,
                   "real_drops": real.get("drops"), "sim_drops": r.totals["drops"],
                   "sim_peak": {m: d["peak_replicas"] for m, d in r.by_model.items()},
                   "real_peak": real.get("max_ready", {}),
                   "overhead_cores": round(used.host.overhead_cores, 3), "overhead_from": how,
                   "real_busy_cores": real.get("busy_cores"),
                   "sim_busy_cores": None if r.cpu_cores is None else
                   round(r.cpu_cores + used.host.overhead_cores, 3)}
            row["replica_s_error"] = _err(row["sim_replica_s"], row["real_replica_s"])
            row["p95_error"] = _err(sim_p95, row["real_p95_ms"])
            row["within"] = (row["replica_s_error"] is not None and abs(row["replica_s_error"]) <= REPLICA_S_TOL
                             and row["p95_error"] is not None and abs(row["p95_error"]) <= P95_TOL)
            rows.append(row)
            if log:
                log(f"{scenario}/{strategy} (overhead {row['overhead_cores']} cores, {how}; busy real "
                    f"{row['real_busy_cores']} sim {row['sim_busy_cores']}): "
                    f"replica-s real {row['real_replica_s']} sim {row['sim_replica_s']} "
                    f"({_pct(row['replica_s_error'])}), P95 real {row['real_p95_ms']} sim {sim_p95} "
                    f"({_pct(row['p95_error'])}) {'OK' if row['within'] else 'OUT'}")
    return {"rows": rows, "pass": bool(rows) and all(r["within"] for r in rows),
            "tolerance": {"replica_s": REPLICA_S_TOL, "p95": P95_TOL}}


def _err(sim: float | None, real: float | None) -> float | None:
    if sim is None or not real:
        return None
    return round((sim - real) / real, 4)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:+.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.calibrate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--experiment", help="results.json of python -m loadtest.experiments")
    p.add_argument("--profiles", help="profiles measured here (cmesh profile)")
    p.add_argument("--overhead-cores", type=float, default=None,
                   help="override the overhead each real run measured (host.overhead_cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-config", metavar="PATH", help="write the experiment's mesh.yaml (for cmesh profile)")
    p.add_argument("--compress", type=float, default=3.0, help="with --write-config (default 3, as --quick)")
    args = p.parse_args(argv)
    if args.write_config:
        demo = yaml.safe_load((REPO / "compose" / "mesh.yaml").read_text())
        Path(args.write_config).write_text(yaml.safe_dump(
            base_config(demo, str(REPO / ".cmesh" / "store"), "127.0.0.1:8500", args.compress)))
        print(f"wrote {args.write_config}")
        if not args.experiment:
            return 0
    if not (args.experiment and args.profiles):
        p.error("--experiment and --profiles are both needed")
    profiles = load_profiles(args.profiles)
    result = compare(json.loads(Path(args.experiment).read_text()), profiles, seed=args.seed,
                     overhead_cores=args.overhead_cores, log=lambda line: print(line, flush=True))
    emit({"pass": result["pass"], "rows": [{k: r[k] for k in ("scenario", "strategy", "real_replica_s",
                                                              "sim_replica_s", "replica_s_error", "real_p95_ms",
                                                              "sim_p95_ms", "p95_error", "overhead_cores",
                                                              "overhead_from", "real_busy_cores",
                                                              "sim_busy_cores", "within")}
                                           for r in result["rows"]]})
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
