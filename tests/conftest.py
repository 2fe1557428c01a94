"""Shared fixtures: the demo model store (built once, reused across runs) and Redis."""
from __future__ import annotations

import os

# Several torch processes share 2 cores in tests (this one and the servers it
# starts, which inherit the environment): idle OpenMP threads must sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from meshtest import REPO, free_port

TEST_STORE = REPO / ".cmesh" / "test-store"


@pytest.fixture(scope="session")
def demo_store() -> Path:
    """The real demo store (MiniLM, classifier, tiny LLMs, KB index, orders DB).

    Built by the same code as `cmesh models bootstrap`; idempotent, so a second
    test run reuses it."""
    from demo_store import bootstrap

    bootstrap(TEST_STORE, progress=lambda line: None)
    return TEST_STORE


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server on a free loopback port, no persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """CA, server cert (localhost, 127.0.0.1), client cert, and a rogue CA + client cert."""
    from pki import make_pki

    return make_pki(tmp_path_factory)
