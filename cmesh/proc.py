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
