"""Calls the command line makes to the autoscaler: the mesh-internal token they
need, and a hint when it is missing."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def internal_token(config_path: str | None) -> tuple[tuple[str, str], ...]:
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


def admin_metadata(flag: str | None) -> list[tuple[str, str]]:
    """Metadata with the admin key for a router's Admin service: the flag, then
    ``$CMESH_ADMIN_KEY``; none when neither is set (the router then refuses by name)."""
    key = flag or os.environ.get("CMESH_ADMIN_KEY")
    return [("authorization", f"Bearer {key}")] if key else []


def token_hint(code, config_path: str | None) -> str:
    import grpc

    if code != grpc.StatusCode.UNAUTHENTICATED:
        return ""
    return (" (the autoscaler wants the mesh-internal token: set the environment variable its config's "
            f"security.internal_token_env names - `make up` prints it - and pass that config with --config; "
            f"now {config_path})")


def replica_seconds(address: str, timeout: float, config_path: str | None = None) -> dict[str, float] | None:
    import grpc

    from protos import mesh_pb2, mesh_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            status = mesh_pb2_grpc.AutoscalerStub(channel).Status(
                mesh_pb2.StatusRequest(), timeout=timeout, metadata=internal_token(config_path))
    except grpc.RpcError as exc:
        print(f"error: autoscaler {address}: {exc.code().name}: {exc.details()}"
              f"{token_hint(exc.code(), config_path)}", file=sys.stderr)
        return None
    return {m.model: m.replica_seconds for m in status.models}
