"""Run tritonclient against a server in a process of its own.

tritonclient's stubs and ours both define the protobuf package ``inference``, so
they cannot be imported into one process; tests run this script instead and read
its JSON. Usage: python tests/triton_probe.py ADDRESS MODEL TEXT... [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tritonclient.grpc as tc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("texts", nargs="+")
    p.add_argument("--input", default="text")
    p.add_argument("--output", default="embedding")
    p.add_argument("--out", required=True, help="write results as JSON here")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    args = p.parse_args()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    client = tc.InferenceServerClient(args.address)
    inp = tc.InferInput(args.input, [len(args.texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in args.texts], dtype=object))
    started = time.monotonic()
    result = client.infer(args.model, [inp], outputs=[tc.InferRequestedOutput(args.output)], headers=headers,
                          client_timeout=300)
    infer_s = time.monotonic() - started
    array = result.as_numpy(args.output)
    report = {
        "infer_s": infer_s,
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(args.model, headers=headers),
        "unknown_model_ready": client.is_model_ready("no-such-model", headers=headers),
        "metadata": client.get_model_metadata(args.model, as_json=True, headers=headers),
        "server_metadata": client.get_server_metadata(as_json=True),
        "output": array.tolist() if array.dtype != object else [x.decode() for x in array.reshape(-1)],
        "parameters": {k: str(v).strip() for k, v in result.get_response().parameters.items()},
    }
    client.close()
    with open(args.out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
