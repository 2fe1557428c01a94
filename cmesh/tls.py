"""TLS and mutual TLS for every gRPC listener and channel (``security`` in mesh.yaml).

``None`` means plaintext everywhere, so a mesh without a ``security`` section
behaves as before. PEM files are read and checked here, once, at startup: gRPC
itself only says "Failed to bind" for a bad key or certificate, so every
problem becomes a ``ConfigError`` naming the setting and the file instead.
"""
from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from cmesh.config import TLSConfig
from cmesh.validation import ConfigError

SERVER_TLS = "security.server_tls"
CLIENT_TLS = "security.client_tls"

_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_CERT_BLOCK_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
_KEY_RE = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_ENCRYPTED_RE = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


class _Problems:
    """Collects every problem of one TLS section so a single error lists them all."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.where, self.lines)


def _read_pem(path: str, field: str, pattern: re.Pattern[bytes], what: str,
              problems: _Problems) -> bytes | None:
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as exc:
        problems.add(f"{field}: cannot read {str(file)!r}: {exc.strerror or exc}")
        return None
    if not pattern.search(data):
        problems.add(f"{field}: {str(file)!r} is not a PEM {what} (no '-----BEGIN' block of that kind)")
        return None
    if field == "key" and _ENCRYPTED_RE.search(data):
        # gRPC cannot take a passphrase; better to say so than to fail at bind.
        problems.add(f"{field}: {str(file)!r} is passphrase-protected; gRPC needs an unencrypted key")
        return None
    return data


def _ssl_reason(exc: ssl.SSLError) -> str:
    # OpenSSL's reason codes read well in lower case ("key values mismatch").
    return exc.reason.replace("_", " ").lower() if exc.reason else "the PEM data does not parse"


def _check_pair(tls: TLSConfig, problems: _Problems) -> None:
    """Load cert + key with the stdlib's OpenSSL: catches a key that does not
    match its certificate, or a PEM body that does not parse, before gRPC does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Level 0: judge only whether the files parse and match; strength policy is
    # gRPC's (BoringSSL's) business, and a stricter local OpenSSL must not veto it.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        # password=b"": an encrypted key fails here instead of prompting on a tty.
        ctx.load_cert_chain(str(Path(tls.cert or "").expanduser()),
                            str(Path(tls.key or "").expanduser()), password=b"")
    except ssl.SSLError as exc:
        problems.add(f"cert: {tls.cert!r} and key {tls.key!r} are not a usable pair: {_ssl_reason(exc)}")


def _check_ca(ca: bytes, problems: _Problems, path: str) -> None:
    # Only the PEM blocks: cadata must be ASCII, and bundles often carry text.
    blocks = b"\n".join(_CERT_BLOCK_RE.findall(ca)).decode("ascii", "replace")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=blocks)
    except ssl.SSLError as exc:
        problems.add(f"ca: {path!r} holds no usable CA certificate: {_ssl_reason(exc)}")


def _load(tls: TLSConfig, where: str, *, need_pair: bool) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(cert, key, ca) as PEM bytes, or a ConfigError listing every problem."""
    problems = _Problems(where)
    if need_pair and (tls.cert is None or tls.key is None):
        problems.add("cert: a listener needs both cert and key")
    elif (tls.cert is None) != (tls.key is None):
        problems.add("cert: give both cert and key, or neither")
    # Repeats the config validator on purpose: a TLSConfig built in code skips
    # it, and a listener that silently accepted any client would be worse.
    if tls.client_auth and tls.ca is None:
        problems.add("ca: client_auth requires a CA to verify client certificates")
    cert = key = ca = None
    if tls.cert is not None and tls.key is not None:
        cert = _read_pem(tls.cert, "cert", _CERT_RE, "certificate", problems)
        key = _read_pem(tls.key, "key", _KEY_RE, "private key", problems)
        if cert is not None and key is not None:
            _check_pair(tls, problems)
    if tls.ca is not None:
        ca = _read_pem(tls.ca, "ca", _CERT_RE, "CA certificate", problems)
        if ca is not None:
            _check_ca(ca, problems, tls.ca)
    problems.raise_if_any()
    return cert, key, ca


def server_credentials(tls: TLSConfig, where: str = SERVER_TLS) -> grpc.ServerCredentials:
    """Credentials for a listener; with ``client_auth`` it demands and verifies
    a client certificate signed by ``ca`` (mutual TLS)."""
    cert, key, ca = _load(tls, where, need_pair=True)
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=tls.client_auth)


def channel_credentials(tls: TLSConfig, where: str = CLIENT_TLS) -> grpc.ChannelCredentials:
    """Credentials for a channel: ``ca`` verifies the server (None: the system's
    roots); cert/key, if given, are this client's identity for mutual TLS."""
    cert, key, ca = _load(tls, where, need_pair=False)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def channel_options(tls: TLSConfig | None) -> list[tuple[str, Any]]:
    """Extra channel options: the name to check in the server certificate when
    we dial an address the certificate does not name (an IP, a pod address)."""
    if tls is None or tls.server_name is None:
        return []
    return [("grpc.ssl_target_name_override", tls.server_name)]


def add_port(server: grpc.aio.Server, address: str, tls: TLSConfig | None) -> int:
    """Listen on ``address`` (TLS when ``tls`` is given); returns the bound port."""
    credentials = None if tls is None else server_credentials(tls)   # ConfigError first
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        # grpc raises RuntimeError("Failed to bind ...") where core returned port 0.
        port = 0
    if port == 0:
        kind = "plaintext" if tls is None else "TLS"
        raise OSError(f"cannot listen on {address} ({kind}): the address is in use or not local "
                      "to this machine (GRPC_VERBOSITY=debug shows gRPC's reason)")
    return port


def _options(options: Sequence[tuple[str, Any]], tls: TLSConfig | None) -> list[tuple[str, Any]]:
    return [*options, *channel_options(tls)]


def open_channel(address: str, tls: TLSConfig | None,
                 options: Sequence[tuple[str, Any]] = (), *,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``; plaintext when ``tls`` is None."""
    interceptors = list(interceptors) if interceptors else None     # None: calls skip interception
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=_options(options, tls),
                                   interceptors=interceptors)


def open_sync_channel(address: str, tls: TLSConfig | None,
                      options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """The blocking-API twin of ``open_channel``."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls), options=_options(options, tls))
