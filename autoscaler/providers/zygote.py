"""A fork server for model-server replicas: import the heavy libraries once, fork
each replica from the warm image.

A replica's cold start is mostly importing torch and transformers (~2 s of CPU
each on this class of machine), and replicas started together compete for the
same cores. The zygote pays that once, when the provider starts; a forked
replica starts at model load. Forking is safe only while the zygote has one
thread: preloading imports modules (gRPC's included) but creates no server, no
channel and runs no torch op, so nothing has started a thread yet.

Protocol (JSON lines): the provider writes {"argv": [...], "stdout": FIFO, "log":
PATH, "env": {...}} on the zygote's stdin; the zygote forks and answers
{"pid": N} (or {"error": "..."}). The child detaches into its own session (it
must outlive the autoscaler), points stdout at the FIFO, stderr at the log, and
runs ``python -m model_server`` in-process.
"""
from __future__ import annotations

import json
import os
import signal
import sys

PRELOAD = ("numpy", "torch", "safetensors", "tokenizers", "transformers",
           "cmesh.config", "cmesh.pipeline_check", "cmesh.manifest", "cmesh.tensors",
           "model_server.engines.base",
           # The server itself (gRPC, health, Prometheus, uvloop, the data plane): ~0.1 s
           # of imports a replica of even the smallest model paid. Importing them starts
           # no thread; servers and channels are made in the child. Nothing here may
           # touch CUDA either (a process forked after that cannot use it): optional
           # engines probe for their GPU on first use, in the replica.
           "uvloop", "grpc", "grpc_health.v1.health", "prometheus_client",
           "model_server.__main__", "model_server.server")


def preload(model_types: list[str]) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # The auto classes, and the modelling code of every architecture the store
    # holds (importing BERT's alone costs over a second): here, once.
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    for model_type in model_types:
        try:
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            pass                                 # not a transformers architecture: nothing to preload
    _build_weight_conversions()


def _build_weight_conversions() -> None:
    """transformers builds its table of checkpoint weight renamings (about a thousand
    regular expressions, ~0.13 s) on the first from_pretrained of each process and
    keeps it in a module global: build it here so every forked replica inherits it.
    A private helper, so a transformers without it is simply not sped up."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return
    get_checkpoint_conversion_mapping("")


def child(request: dict) -> None:
    """In the forked child: detach, redirect, run the model server, never return."""
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        out = os.open(request["stdout"], os.O_WRONLY)
        os.dup2(out, 1)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.environ.update(request.get("env", {}))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.argv = ["model_server", *request["argv"]]
        from model_server.__main__ import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - report, then exit the child
        print(f"replica failed to start: {exc!r}", file=sys.stderr)
        code = 1
    os._exit(code or 0)


def die_with_parent() -> None:
    """The fork server only serves the autoscaler that started it: if that dies
    (even by SIGKILL), go too. Replicas forked earlier do not inherit this and
    keep serving - a new autoscaler adopts them."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return                                   # not Linux: the autoscaler closes our stdin instead
    if os.getppid() != parent:                  # the parent died before prctl took effect
        sys.exit(0)


def serve(model_types: list[str]) -> None:
    die_with_parent()
    # Should anything ask torch whether CUDA is there before we fork, answer from
    # NVML instead of initialising the driver (torch's documented remedy for
    # "CUDA initialization error" in forked children).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    preload(model_types)
    # Forked replicas are reparented to init when they exit after we do; while we
    # live, reap them so none lingers as a zombie.
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            pid = os.fork()
        except (ValueError, OSError) as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
            continue
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    serve([t for t in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if t.isidentifier()])
