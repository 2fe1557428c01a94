"""A tiny KServe model server for the oip-backend tests: ``kserve.ModelServer`` with
one ``kserve.Model`` on a gRPC port, run with the KServe venv's Python (KServe's stubs
register the protobuf package ``inference`` too, so it cannot share our process).

``doubler``: x FP32[-1, 4] -> y = 2x, and ``served_by`` (BYTES[1]) naming this
server (``--tag``), so a test sees which process answered. With ``--token`` every
call must carry ``authorization: Bearer <token>``; ``--sleep-ms`` slows each call.

    python tests/kserve_model.py --grpc-port 9001 --http-port 9002 --tag k1 [--token T]
"""
from __future__ import annotations

import argparse
import asyncio
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a one-model KServe server for tests")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--tag", default="kserve")
    p.add_argument("--name", default="doubler", help="the model's name on this server")
    p.add_argument("--token", default="", help="require 'authorization: Bearer <token>'")
    p.add_argument("--sleep-ms", type=float, default=0.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.argv = sys.argv[:1]            # kserve parses sys.argv at import
    import numpy as np
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
    from kserve.errors import InvalidInput

    class Doubler(Model):
        def __init__(self) -> None:
            super().__init__(args.name)
            self.ready = False

        def load(self) -> bool:
            self.ready = True
            return True

        def get_input_types(self):
            return [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]

        def get_output_types(self):
            return [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "served_by", "datatype": "BYTES", "shape": [1]}]

        async def predict(self, payload: InferRequest, headers=None, response_headers=None):
            if args.token and (headers or {}).get("authorization") != f"Bearer {args.token}":
                raise InvalidInput("missing or wrong credential")
            if any(k.startswith("cmesh-") for k in (payload.parameters or {})):
                raise InvalidInput("mesh-internal parameters leaked to an external server")
            if args.sleep_ms:
                await asyncio.sleep(args.sleep_ms / 1000.0)
            x = payload.inputs[0].as_numpy().astype(np.float32)
            y = InferOutput(name="y", shape=list(x.shape), datatype="FP32")
            y.set_data_from_numpy(2 * x, binary_data=True)
            tag = InferOutput(name="served_by", shape=[1], datatype="BYTES")
            tag.set_data_from_numpy(np.array([args.tag.encode()], dtype=np.object_), binary_data=True)
            return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[y, tag],
                                 use_binary_outputs=True)

    model = Doubler()
    model.load()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                enable_latency_logging=False).start([model])


if __name__ == "__main__":
    main()
