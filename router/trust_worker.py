"""``python -m router.trust_worker``: a child of the router that masks large texts.

Frames on stdin and stdout: an 8-byte big-endian length, then a pickle. A
request is ``(function name, args)`` for one of ``FUNCTIONS``; the answer is
``("ok", result)`` or ``("error", exception class name, message)``. Only the
router that started it writes to its stdin.
"""
from __future__ import annotations

import os
import pickle
import struct
import sys

from router.trust_mask import mask_raw, mask_values

FUNCTIONS = {"mask_raw": mask_raw, "mask_values": mask_values}
HEADER = struct.Struct(">Q")


def serve(stdin, stdout) -> None:
    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return                       # the router closed our stdin: exit
        name, args = pickle.loads(stdin.read(HEADER.unpack(header)[0]))
        try:
            answer = ("ok", FUNCTIONS[name](*args))
        except Exception as exc:  # noqa: BLE001 - reported to the router, which maps it
            answer = ("error", type(exc).__name__, str(exc))
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(HEADER.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    # Below the router and the replicas on the same machine: hostile large texts
    # must not take CPU from everyone else's requests.
    os.nice(5)
    serve(sys.stdin.buffer, sys.stdout.buffer)
