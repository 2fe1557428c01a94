"""``cmesh profile`` (measure a model's profile here) and ``cmesh plan`` (simulate a
mesh on a workload; with ``--slo``, search for the cheapest settings)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmesh.cli.defaults import DEFAULT_CONFIG


def _cmd_profile(args: argparse.Namespace) -> int:
    from cmesh.config import load_config
    from sim.measure import measure
    from sim.profiles import dump_profiles

    config = load_config(args.config)
    models = args.model or list(config.models)
    unknown = [m for m in models if m not in config.models]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)} in {args.config}", file=sys.stderr)
        return 1
    texts = None
    if args.scenario:
        from loadtest.scenario import load_scenario
        from sim.measure import scenario_texts

        texts = scenario_texts(load_scenario(args.scenario), config)
    profiles = measure(config, Path(args.config), models, cold_starts=args.cold_starts, repeats=args.repeats,
                       cores=args.cores, texts=texts, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = dump_profiles(profiles)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(profiles.models)} model(s))", file=sys.stderr)
    else:
        print(text)
    return 0 if profiles.models else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from cmesh.config import load_config
    from sim.mesh import SimOptions, simulate
    from sim.plan import SLO, fragment, search, table
    from sim.profiles import load_profiles
    from sim.workload import from_scenario, from_trace

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    if args.scenario:
        from loadtest.scenario import load_scenario

        sc = load_scenario(args.scenario)
        workload = from_scenario(sc, compress=sc.compress * args.compress, rate_scale=args.rate_scale)
    else:
        workload = from_trace(args.trace, config)
    strategy = {"permodel": "permodel", "per-model": "permodel"}.get(args.strategy, args.strategy)
    options = SimOptions(strategy=strategy, seed=args.seed, warm_start=not args.cold)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    if args.slo is None:
        result = simulate(config, profiles, workload, options, progress=log)
        print(json.dumps(result.to_dict(), indent=2) if args.json else table(result))
        return 0
    slo = SLO(p95_ms=args.slo, targets=tuple(args.slo_target or ()))
    best_config, best, runs = search(config, profiles, workload, slo, options, max_runs=args.max_runs, log=log)
    print(table(best))
    print(f"\n# {'meets' if slo.met(best) else 'does NOT meet'} P95 <= {args.slo:g} ms "
          f"({runs} simulated runs); mesh.yaml fragment:")
    print(fragment(best_config, config), end="")
    return 0 if slo.met(best) else 2


def add_parsers(sub) -> None:
    prof = sub.add_parser("profile", help="measure models' profiles (batching curve, cold start) here",
                          description="Start real replicas of each model on this machine and measure "
                                      "latency by batch size and cold start; print (or --out) the "
                                      "profiles as YAML for cmesh plan --profiles.")
    prof.add_argument("model", nargs="*", help="models of the config (default: every model)")
    prof.add_argument("--config", default=DEFAULT_CONFIG, help=f"mesh.yaml (default {DEFAULT_CONFIG})")
    prof.add_argument("--cold-starts", type=int, default=3, help="replica starts to time (default 3)")
    prof.add_argument("--repeats", type=int, default=5, help="batches per batch size (default 5)")
    prof.add_argument("--cores", type=float, default=None,
                      help="host.cores to record for CPU sharing (default: this machine's CPU count)")
    prof.add_argument("--scenario", default=None,
                      help="send each model the request texts of this replay scenario's classes that reach it")
    prof.add_argument("--out", default=None, help="write the YAML here")
    prof.set_defaults(func=_cmd_profile)

    plan = sub.add_parser("plan", help="predict cost and latency of a mesh on a workload (simulated)",
                          description="Simulate the mesh (its autoscaler and router policies, simulated "
                                      "replicas from --profiles) on a replay scenario or a trace file: "
                                      "replica-seconds and cost, P50/P95/P99, peak replicas and drops per "
                                      "model and pipeline. With --slo, search per-model target_concurrency "
                                      "and min_replicas for the cheapest settings that meet it.")
    plan.add_argument("--config", default=DEFAULT_CONFIG, help=f"mesh.yaml (default {DEFAULT_CONFIG})")
    src = plan.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenario", help="a replay scenario (loadtest/scenarios/*.yaml)")
    src.add_argument("--trace", help="a trace file: CSV timestamp,target,latency_class[,text]")
    plan.add_argument("--profiles", default="paper",
                      help="profiles YAML, or the name of a shipped one (default: paper)")
    plan.add_argument("--strategy", default="permodel", choices=["permodel", "per-model", "uniform", "static"])
    plan.add_argument("--compress", type=float, default=1.0, help="extra time compression of the scenario")
    plan.add_argument("--rate-scale", type=float, default=1.0, help="multiply every scenario rate")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--cold", action="store_true", help="start from zero replicas (default: warmed first)")
    plan.add_argument("--slo", type=float, default=None, metavar="P95_MS",
                      help="search for the cheapest settings with P95 <= this on interactive targets")
    plan.add_argument("--slo-target", action="append", metavar="KEY",
                      help="restrict the SLO to a target, e.g. 'pipeline:support-agent|interactive'")
    plan.add_argument("--max-runs", type=int, default=40, help="simulations the search may run")
    plan.add_argument("--json", action="store_true", help="the prediction as JSON")
    plan.add_argument("--quiet", action="store_true", help="no progress on stderr")
    plan.set_defaults(func=_cmd_plan)
