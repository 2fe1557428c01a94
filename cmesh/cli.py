"""The ``cmesh`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_STORE = ".cmesh/store"
DEFAULT_ROUTER = "127.0.0.1:8000"
DEFAULT_CONFIG = "compose/mesh.yaml"


def _cmd_models_bootstrap(args: argparse.Namespace) -> int:
    from cmesh.bootstrap import bootstrap

    store = Path(args.store)
    started = time.monotonic()
    print(f"bootstrapping the demo model store in {store}", flush=True)
    records = bootstrap(store, progress=lambda line: print(line, flush=True),
                        only=args.only or None, force=args.force)
    built = sum(1 for r in records if r.action == "built")
    print(f"done in {time.monotonic() - started:.1f}s: {built} built, "
          f"{len(records) - built} up to date", flush=True)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from cmesh.cli_models import store_options
    from cmesh.store import ModelStore

    store = ModelStore(args.store, storage_options=store_options(args.store_option))
    rows = []
    for name, version in store.versions():
        m = store.manifest(f"store://{name}/{version}")
        rows.append({"model": f"{name}/{version}", "engine": m.engine, "memory_mb": m.memory_mb,
                     "inputs": [f"{t.name}:{t.datatype}{t.shape}" for t in m.inputs],
                     "outputs": [f"{t.name}:{t.datatype}{t.shape}" for t in m.outputs]})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models in {args.store}; run `cmesh models bootstrap --store {args.store}`")
    else:
        width = max(len(r["model"]) for r in rows)
        for r in rows:
            print(f"{r['model']:<{width}}  {r['engine']:<14} {r['memory_mb']:>5} MB  "
                  f"in={','.join(r['inputs'])}  out={','.join(r['outputs'])}")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    """One request to any OIP endpoint: texts in, outputs printed."""
    import asyncio

    import grpc
    import numpy as np

    from cmesh.client import AsyncClient, build_request
    from cmesh.errors import component_error_of

    texts = np.array([t.encode() for t in args.text], dtype=object)
    params = {"max_tokens": args.max_tokens} if args.max_tokens else {}

    def show(outputs: dict) -> None:
        for name, array in outputs.items():
            if array.dtype == object:
                values = [v.decode(errors="replace") for v in array.reshape(-1)]
                print(f"{name}: {values if len(values) > 1 else values[0]}")
            else:
                print(f"{name}: shape {list(array.shape)} {np.array2string(array.reshape(-1)[:8], precision=4)}"
                      f"{' ...' if array.size > 8 else ''}")

    async def run() -> int:
        key = args.api_key or os.environ.get("CMESH_API_KEY")
        client = AsyncClient(args.address, metadata=[("authorization", f"Bearer {key}")] if key else None)
        try:
            if args.input is None:     # the model's first input, from its metadata
                from protos import inference_pb2 as pb

                meta = await client.stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model),
                                                       timeout=args.timeout, metadata=client.metadata)
                args.input = meta.inputs[0].name
            if args.stream:
                request = build_request(args.model, {args.input: texts}, parameters=params)
                async for response in client.stream([request], timeout=args.timeout):
                    if response.error_message:
                        print(f"error: {response.error_message}", file=sys.stderr)
                        return 1
                    out = response.infer_response
                    for raw in out.raw_output_contents:
                        print(raw[4:].decode(errors="replace"), end="", flush=True)
                print()
                return 0
            result = await client.infer(args.model, {args.input: texts}, parameters=params,
                                        timeout=args.timeout)
            show(result.outputs)
            print(f"({', '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in result.parameters.items())})")
            return 0
        except grpc.aio.AioRpcError as exc:
            err = component_error_of(exc)
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
        finally:
            await client.close()

    return asyncio.run(run())


def _cmd_cost(args: argparse.Namespace) -> int:
    """The cost report: straight from the metering store in Redis, or from a router."""
    import asyncio
    import os

    from cmesh.cost import build_report, format_table, format_warning, report_from_proto, to_json

    redis_url, router = args.redis, args.router
    if redis_url is None and router is None:
        redis_url = os.environ.get("REDIS_URL") or None     # the CLI's entry point: no config to consult
        router = None if redis_url else DEFAULT_ROUTER

    def from_redis(url: str):
        from cmesh.config import load_config
        from cmesh.errors import MeshError
        from router.metering import RedisMeter

        from cmesh.validation import ConfigError

        try:                                   # prices; the router uses its own with --router
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}\n(--redis prices the rows with --config PATH)", file=sys.stderr)
            return None

        async def read() -> list:
            meter = RedisMeter(url, timeout_s=args.timeout)
            try:
                return await meter.rows()
            finally:
                await meter.close()

        try:
            return build_report(asyncio.run(read()), config, args.by)
        except MeshError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return None

    def from_router(address: str):
        import grpc

        from cmesh.errors import component_error_of
        from protos import mesh_pb2, mesh_pb2_grpc

        key = args.admin_key or os.environ.get("CMESH_ADMIN_KEY")
        metadata = [("authorization", f"Bearer {key}")] if key else []
        with grpc.insecure_channel(address) as channel:
            try:
                response = mesh_pb2_grpc.AdminStub(channel).CostReport(
                    mesh_pb2.CostReportRequest(group_by=args.by), timeout=args.timeout,
                    metadata=metadata)
            except grpc.RpcError as exc:
                err = component_error_of(exc)
                hint = ""
                if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    hint = (f"; is a router listening on {address}? start one, or pass "
                            "--router HOST:PORT, or --redis URL to read the metering store directly")
                elif err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    hint = "; pass an admin key with --admin-key KEY or CMESH_ADMIN_KEY"
                print(f"error: router {address}: {err.code.name}: {err.message}{hint}", file=sys.stderr)
                return None
        return report_from_proto(response)

    report = from_redis(redis_url) if redis_url else from_router(router)
    if report is None:
        return 1
    idle = None
    if args.autoscaler:
        # Idle capacity: replica time the autoscaler ran, minus compute requests used.
        replica_s = _replica_seconds(args.autoscaler, args.timeout, args.config)
        if replica_s is None:
            return 1
        if args.by != "model":
            args.by = "model"
            by_model = from_redis(redis_url) if redis_url else from_router(router)
            if by_model is None:
                return 1
        else:
            by_model = report
        from cmesh.config import load_config
        from cmesh.cost import idle_capacity

        idle = idle_capacity(replica_s, {line.key: line.compute_s for line in by_model.rows},
                             load_config(args.config))
    warning = format_warning(report)          # events spooled or dropped by the router
    if args.json:
        out = to_json(report)
        if idle is not None:
            out["idle_capacity"] = [vars(line) for line in idle]
        if warning:
            print(warning, file=sys.stderr)   # stdout stays JSON; "incomplete" says the same
        print(json.dumps(out, indent=2))
    else:
        if warning:
            print(warning)
        print(format_table(report))
        if idle is not None:
            from cmesh.cost import format_idle

            print("\n" + format_idle(idle))
    return 0


def _internal_token(config_path: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata with the mesh-internal token for calls to the autoscaler: the env var
    that the config's security.internal_token_env names, when both exist."""
    from cmesh.internal_auth import HEADER

    name = None
    if config_path and Path(config_path).is_file():
        from cmesh.config import load_config
        from cmesh.validation import ConfigError

        try:
            name = load_config(config_path).security.internal_token_env
        except ConfigError:
            name = None
    token = os.environ.get(name, "").strip() if name else ""
    return ((HEADER, token),) if token else ()


def _token_hint(code, config_path: str | None) -> str:
    import grpc

    if code != grpc.StatusCode.UNAUTHENTICATED:
        return ""
    return (" (the autoscaler wants the mesh-internal token: set the environment variable its config's "
            f"security.internal_token_env names - `make up` prints it - and pass that config with --config; "
            f"now {config_path})")


def _replica_seconds(address: str, timeout: float, config_path: str | None = None) -> dict[str, float] | None:
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            status = mesh_pb2_grpc.AutoscalerStub(channel).Status(
                mesh_pb2.StatusRequest(), timeout=timeout, metadata=_internal_token(config_path))
    except grpc.RpcError as exc:
        print(f"error: autoscaler {address}: {exc.code().name}: {exc.details()}"
              f"{_token_hint(exc.code(), config_path)}", file=sys.stderr)
        return None
    return {m.model: m.replica_seconds for m in status.models}


def _cmd_status(args: argparse.Namespace) -> int:
    """Each model's pools and replicas as the autoscaler sees them, and device use."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from protos import mesh_pb2, mesh_pb2_grpc

    try:
        with grpc.insecure_channel(args.autoscaler) as channel:
            status = mesh_pb2_grpc.AutoscalerStub(channel).Status(
                mesh_pb2.StatusRequest(), timeout=args.timeout, metadata=_internal_token(args.config))
    except grpc.RpcError as exc:
        hint = _token_hint(exc.code(), args.config) or \
            "; is one running? (make up starts one; pass --autoscaler HOST:PORT)"
        print(f"error: autoscaler {args.autoscaler}: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"autoscaler {args.autoscaler}  {'leader' if status.leader else 'standby'}  "
          f"endpoint table v{status.endpoint_version}")
    print(f"{'model':<18} {'mode':<10} {'want d/s':>8} {'replicas':<34} {'queue':>5} {'held':>4} "
          f"{'cold start':>10}  decision")
    for m in status.models:
        states: dict[str, int] = {}
        for r in m.replicas:
            states[r.state] = states.get(r.state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "0 (scaled to zero)"
        cold = f"{m.last_cold_start_s:.2f}s" if m.last_cold_start_s else "-"
        print(f"{m.model:<18} {m.mode:<10} {m.desired_dedicated:>3}/{m.desired_serverless:<4} {summary:<34} "
              f"{m.queue_depth:>5} {m.held:>4} {cold:>10}  {'PANIC ' if m.panic else ''}{m.last_decision}")
        if args.replicas:
            for r in m.replicas:
                print(f"    {r.id:<36} {r.pool:<10} {r.state:<9} {r.address:<22} {r.device:<6} "
                      f"cold start {r.cold_start_s:.2f}s, up {r.age_s:.0f}s")
    print("devices:")
    for d in status.devices:
        pct = 100.0 * d.used_mb / d.memory_mb if d.memory_mb else 0.0
        print(f"  {d.name:<8} {d.kind:<5} {d.used_mb:>6}/{d.memory_mb} MB ({pct:.0f}%), {d.replicas} replica(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmesh", description="Compound Mesh command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model store", description="Manage the model store.")
    msub = models.add_subparsers(dest="models_command", required=True)
    boot = msub.add_parser("bootstrap", help="build the demo model store offline (idempotent)",
                           description="Build the demo models into the store: MiniLM, the intent "
                                       "classifier (trained here), two tiny LLMs, the KB index and "
                                       "the orders database. Versions already built are skipped.")
    boot.add_argument("--store", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    boot.add_argument("--only", action="append", metavar="NAME[/VERSION]",
                      help="build only this artifact (repeatable)")
    boot.add_argument("--force", action="store_true", help="rebuild even when up to date")
    boot.set_defaults(func=_cmd_models_bootstrap)
    lst = msub.add_parser("list", help="list the versions in a store",
                          description="List every model version in the store with its manifest.")
    lst.add_argument("--store", default=DEFAULT_STORE, help="store root: path or fsspec URL (s3://...)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_models_list)

    from cmesh.cli_models import add_push_parser, add_store_options

    add_store_options(lst)
    add_push_parser(msub, DEFAULT_STORE)

    infer = sub.add_parser("infer", help="send one request to a model",
                           description="Send texts to a model over the Open Inference Protocol and print "
                                       "its outputs (or stream a generative model's tokens).")
    infer.add_argument("model")
    infer.add_argument("--text", action="append", required=True, help="input text (repeatable: a batch)")
    infer.add_argument("--input", default=None, help="input tensor name (default: the model's first input)")
    infer.add_argument("--address", default="127.0.0.1:8001", help="host:port of a model server or router")
    infer.add_argument("--stream", action="store_true", help="stream tokens over ModelStreamInfer")
    infer.add_argument("--max-tokens", type=int, default=None)
    infer.add_argument("--timeout", type=float, default=60.0)
    infer.add_argument("--api-key", default=None, help="tenant API key (default: $CMESH_API_KEY)")
    infer.set_defaults(func=_cmd_infer)

    status = sub.add_parser("status", help="pools, replicas, queues, cold starts, device use",
                            description="Show each model's pools and replicas (cold, warming, ready, draining), "
                                        "queue depth, measured cold starts and device utilisation, as the "
                                        "autoscaler sees them.")
    status.add_argument("--autoscaler", default="127.0.0.1:8500", help="host:port of the autoscaler")
    status.add_argument("--replicas", action="store_true", help="list every replica")
    status.add_argument("--json", action="store_true")
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--config", default=DEFAULT_CONFIG,
                        help="mesh.yaml whose security.internal_token_env names the env var holding the "
                             f"mesh-internal token the autoscaler wants (default {DEFAULT_CONFIG})")
    status.set_defaults(func=_cmd_status)

    from cmesh.cli_pipeline import add_parser as add_pipeline_parser

    add_pipeline_parser(sub)

    from cmesh.cli_plan import add_parsers as add_plan_parsers

    add_plan_parsers(sub)                  # cmesh profile, cmesh plan

    cost = sub.add_parser("cost", help="the cost report by pipeline, tenant, model or variant",
                          description="Print metered requests, errors, tokens, compute seconds and "
                                      "cost. Reads the metering store with --redis (priced by "
                                      "--config), or asks a router's Admin service with --router. "
                                      "With neither: REDIS_URL if set, else the router at "
                                      f"{DEFAULT_ROUTER}.")
    cost.add_argument("--by", default="pipeline", choices=["pipeline", "tenant", "model", "variant"],
                      help="group rows by this (default pipeline; variant groups by model:variant)")
    cost.add_argument("--json", action="store_true", help="machine-readable output")
    cost.add_argument("--autoscaler", default=None, metavar="HOST:PORT",
                      help="also show idle capacity: replica time the autoscaler ran that no request used")
    cost.add_argument("--config", default=DEFAULT_CONFIG,
                      help=f"mesh.yaml with the prices, used with --redis, and naming the env var of the "
                           f"mesh-internal token for --autoscaler (default {DEFAULT_CONFIG})")
    source = cost.add_mutually_exclusive_group()
    source.add_argument("--redis", metavar="URL", default=None, help="read the metering store in Redis")
    source.add_argument("--router", metavar="HOST:PORT", default=None,
                        help=f"ask this router's Admin service (default {DEFAULT_ROUTER})")
    cost.add_argument("--admin-key", default=None,
                      help="admin API key for --router (default: $CMESH_ADMIN_KEY)")
    cost.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Redis or the router")
    cost.set_defaults(func=_cmd_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
