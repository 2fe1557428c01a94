"""Process facts: how long this process has existed (for cold-start measurement)."""
from __future__ import annotations

import os
import time

_IMPORTED_AT = time.monotonic()


def process_age() -> float:
    """Seconds since this process started, including the interpreter's own start-up.

    Linux: /proc/self/stat's start time (clock ticks since boot) against
    CLOCK_BOOTTIME. Elsewhere: seconds since this module was imported."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # stat field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED_AT


def spawn_service(module_args: list[str], *, env: dict | None = None, stderr=None, cwd=None,
                  new_session: bool = False):
    """Start ``python -m <service> ...`` and wait for its one-line JSON ready event.

    Every cmesh service prints ``{"event": "ready", ...}`` on stdout once it
    serves; returns (process, that event). Raises RuntimeError if the process
    exits first."""
    import json
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, *module_args], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=env, cwd=cwd, start_new_session=new_session)
    for line in proc.stdout:
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "ready":
                return proc, event
    proc.wait()
    raise RuntimeError(f"{' '.join(module_args[:2])} exited (code {proc.returncode}) before it was ready")


def settle_heap() -> None:
    """Once a service is up: what start-up loaded (modules, config, models) never
    becomes garbage, so move it out of the collector's sight (``gc.freeze``, which
    costs nothing; no collection first, so the cold start does not grow). Full
    collections then scan only what requests allocate: over everything, one paused
    the event loop for about 100 ms."""
    import gc

    gc.freeze()


def run_service(main, log_level: str, *, fatal: tuple[type[BaseException], ...] = (), what: str = "") -> int:
    """A service's entry point: logging at ``log_level``, then ``main()`` (a coroutine
    function returning the exit code) on uvloop. An invalid config exits 2 with its
    message; the ``fatal`` start-up errors (a port in use, a model that cannot load)
    exit 1 with "cannot start the ``what``"."""
    import logging
    import sys

    import uvloop

    from cmesh.validation import ConfigError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return uvloop.run(main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fatal as exc:
        print(f"error: cannot start the {what}: {exc}", file=sys.stderr)
        return 1
