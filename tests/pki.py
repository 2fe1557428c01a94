"""A throw-away PKI for TLS tests, made with the openssl command line (Debian:
package openssl, pulled in by ca-certificates), so no extra Python package."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# A self-contained config, so neither the system's openssl.cnf nor its absence matters.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
SERVER_EXT = """\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""
CLIENT_EXT = """\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path               # valid CA, trusted by nobody
    rogue_cert: Path             # client cert signed by the rogue CA
    rogue_key: Path


def _openssl(d: Path, *args: str) -> None:
    out = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{out.stderr}")


def _new_key_args(name: str) -> list[str]:
    # P-256 keys: generated in milliseconds, unlike RSA.
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]


def _make_ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-config", "openssl.cnf", "-extensions", "ca_ext", *_new_key_args(name),
             "-out", f"{name}.pem", "-days", "7", "-subj", f"/CN={name}")


def _make_leaf(d: Path, name: str, cn: str, ca: str, ext: str, serial: int) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "req", "-new", "-config", "openssl.cnf", *_new_key_args(name), "-out", f"{name}.csr",
             "-subj", f"/CN={cn}")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "7", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem")


def make_pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (Debian: apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    _make_ca(d, "ca")
    _make_leaf(d, "server", "localhost", "ca", SERVER_EXT, 2)
    _make_leaf(d, "client", "cmesh-test-client", "ca", CLIENT_EXT, 3)
    _make_ca(d, "rogue-ca")
    _make_leaf(d, "rogue", "cmesh-test-client", "rogue-ca", CLIENT_EXT, 2)
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key", rogue_ca=d / "rogue-ca.pem",
               rogue_cert=d / "rogue.pem", rogue_key=d / "rogue.key")


