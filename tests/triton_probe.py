"""Run tritonclient against a server in a process of its own.

tritonclient's stubs and ours both define the protobuf package ``inference``, so
they cannot be imported into one process; tests run this script instead and read
its JSON. Usage: python tests/triton_probe.py ADDRESS MODEL TEXT... [--out FILE]
"""
from __future__ import annotations

import argparse
import json

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
    args = p.parse_args()
    client = tc.InferenceServerClient(args.address)
    inp = tc.InferInput(args.input, [len(args.texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in args.texts], dtype=object))
    result = client.infer(args.model, [inp], outputs=[tc.InferRequestedOutput(args.output)])
    array = result.as_numpy(args.output)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "metadata": client.get_model_metadata(args.model, as_json=True),
        "server_metadata": client.get_server_metadata(as_json=True),
        "output": array.tolist() if array.dtype != object else [x.decode() for x in array.reshape(-1)],
        "parameters": {k: str(v).strip() for k, v in result.get_response().parameters.items()},
    }
    client.close()
    with open(args.out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
