"""``cmesh infer``: one request to any OIP endpoint."""
from __future__ import annotations

import argparse
import os
import sys


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


def add_parsers(sub) -> None:
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


