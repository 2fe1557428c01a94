"""The ``cmesh`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_STORE = ".cmesh/store"


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
    from cmesh.store import ModelStore

    store = ModelStore(args.store)
    rows = []
    for name, version in store.versions():
        m = store.open(f"store://{name}/{version}").manifest
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
        client = AsyncClient(args.address)
        try:
            if args.input is None:     # the model's first input, from its metadata
                from protos import inference_pb2 as pb

                meta = await client.stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model),
                                                       timeout=args.timeout)
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
    lst.add_argument("--store", default=DEFAULT_STORE)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_models_list)

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
    infer.set_defaults(func=_cmd_infer)
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
