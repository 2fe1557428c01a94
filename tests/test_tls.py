"""TLS and mutual TLS (``security.server_tls`` / ``client_tls``) against a real
in-process model server, plus the startup errors a bad TLS setup must give.

Certificates come from the ``openssl`` command line (Debian: package openssl,
pulled in by ca-certificates), so the tests need no extra Python package.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from cmesh.client import AsyncClient, Client
from cmesh.config import TLSConfig, parse_config
from cmesh.tls import add_port, channel_credentials, server_credentials
from cmesh.validation import ConfigError
from meshtest import REPO, mesh_config, running_server, sleep_model, write_config

X = {"x": np.full((1, 4), 3.0, dtype=np.float32)}
CALL_TIMEOUT_S = 10          # a refused handshake fails at once; this only stops a hang

def tls_config(tmp_path: Path, server_tls: dict):
    source = sleep_model(tmp_path, sleep_ms=1)
    return mesh_config(tmp_path, {"sleepy": {"source": source}}, security={"server_tls": server_tls})


async def call(address: str, tls: TLSConfig | None) -> grpc.StatusCode:
    """OK when an inference round-trips over this client's channel, else the failure code."""
    client = AsyncClient(address, tls=tls)
    try:
        result = await client.infer("sleepy", X, timeout=CALL_TIMEOUT_S)
        assert result.outputs["y"].tolist() == [[3.0] * 4]
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await client.close()


def sync_call(address: str, tls: TLSConfig | None) -> grpc.StatusCode:
    try:
        with Client(address, tls=tls) as client:
            client.infer("sleepy", X, timeout=CALL_TIMEOUT_S)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


async def test_tls_listener_serves_clients_that_trust_its_ca_only(tmp_path, pki) -> None:
    config = tls_config(tmp_path, {"cert": str(pki.server_cert), "key": str(pki.server_key)})
    async with running_server(config, ["sleepy"]) as server:
        address = f"127.0.0.1:{server.port}"
        trusted = TLSConfig(ca=str(pki.ca))
        assert await call(address, trusted) == grpc.StatusCode.OK
        # The blocking client must not run on the loop that serves it.
        assert await asyncio.to_thread(sync_call, address, trusted) == grpc.StatusCode.OK
        assert await call(address, None) == grpc.StatusCode.UNAVAILABLE             # plaintext
        assert await call(address, TLSConfig(ca=str(pki.rogue_ca))) == grpc.StatusCode.UNAVAILABLE
        # server_name: the name checked in the certificate instead of the dialled host.
        named = TLSConfig(ca=str(pki.ca), server_name="localhost")
        assert await call(address, named) == grpc.StatusCode.OK
        misnamed = TLSConfig(ca=str(pki.ca), server_name="elsewhere.example")
        assert await call(address, misnamed) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_with_a_cert_from_its_ca(tmp_path, pki) -> None:
    config = tls_config(tmp_path, {"cert": str(pki.server_cert), "key": str(pki.server_key),
                                   "ca": str(pki.ca), "client_auth": True})
    async with running_server(config, ["sleepy"]) as server:
        address = f"127.0.0.1:{server.port}"
        member = TLSConfig(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        assert await call(address, member) == grpc.StatusCode.OK
        assert await asyncio.to_thread(sync_call, address, member) == grpc.StatusCode.OK
        no_cert = TLSConfig(ca=str(pki.ca))
        assert await call(address, no_cert) == grpc.StatusCode.UNAVAILABLE
        rogue = TLSConfig(ca=str(pki.ca), cert=str(pki.rogue_cert), key=str(pki.rogue_key))
        assert await call(address, rogue) == grpc.StatusCode.UNAVAILABLE
        assert await call(address, None) == grpc.StatusCode.UNAVAILABLE


def test_client_auth_without_ca_fails_validation_naming_the_field(pki) -> None:
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_auth": True}
    with pytest.raises(ConfigError) as err:
        parse_config({"security": {"server_tls": tls}})
    assert any(line.startswith("security.server_tls.ca: client_auth requires a CA") for line in err.value.errors)


def test_model_server_command_refuses_client_auth_without_ca(tmp_path, pki) -> None:
    cfg = write_config(tmp_path / "mesh.yaml", {
        "models": {"a": {"source": "store://a/1"}},
        "security": {"server_tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                                    "client_auth": True}}})
    out = subprocess.run([sys.executable, "-m", "model_server", "--config", str(cfg), "--models", "a"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "security.server_tls.ca: client_auth requires a CA" in out.stderr


async def test_server_with_a_missing_cert_file_fails_to_start_naming_it(tmp_path, pki) -> None:
    missing = tmp_path / "no-such-dir" / "server.pem"
    config = tls_config(tmp_path, {"cert": str(missing), "key": str(pki.server_key)})
    with pytest.raises(ConfigError) as err:
        async with running_server(config, ["sleepy"]):
            pass
    message = str(err.value)
    assert message.startswith("invalid security.server_tls:")
    assert f"cert: cannot read {str(missing)!r}: No such file or directory" in message


def test_bad_pem_files_are_named_with_what_is_wrong(tmp_path, pki) -> None:
    swapped = TLSConfig(cert=str(pki.server_key), key=str(pki.server_cert))
    with pytest.raises(ConfigError) as err:
        server_credentials(swapped)
    assert err.value.errors == [f"cert: {str(pki.server_key)!r} is not a PEM certificate "
                                "(no '-----BEGIN' block of that kind)",
                                f"key: {str(pki.server_cert)!r} is not a PEM private key "
                                "(no '-----BEGIN' block of that kind)"]
    mismatched = TLSConfig(cert=str(pki.server_cert), key=str(pki.client_key))
    with pytest.raises(ConfigError, match="are not a usable pair: key values mismatch"):
        server_credentials(mismatched)
    with pytest.raises(ConfigError, match=r"ca: .* is not a PEM CA certificate"):
        channel_credentials(TLSConfig(ca=str(pki.client_key)))


def test_credentials_recheck_what_the_validator_would_have_caught(pki) -> None:
    # model_construct skips validation, as a TLSConfig built in code might.
    open_mtls = TLSConfig.model_construct(cert=str(pki.server_cert), key=str(pki.server_key),
                                          ca=None, client_auth=True, server_name=None)
    with pytest.raises(ConfigError, match="ca: client_auth requires a CA"):
        server_credentials(open_mtls)
    with pytest.raises(ConfigError, match="cert: a listener needs both cert and key"):
        server_credentials(TLSConfig(ca=str(pki.ca)))
    with pytest.raises(ConfigError) as err:
        channel_credentials(TLSConfig(ca=str(pki.ca) + ".missing"))
    assert str(err.value).startswith("invalid security.client_tls:")


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_add_port_raises_oserror_when_it_cannot_bind(pki, tls) -> None:
    server = grpc.aio.server()
    config = TLSConfig(cert=str(pki.server_cert), key=str(pki.server_key)) if tls else None
    try:
        with pytest.raises(OSError, match=r"cannot listen on 192\.0\.2\.1:0"):
            add_port(server, "192.0.2.1:0", config)          # TEST-NET-1: never local
    finally:
        await server.stop(None)
