"""The trust layer applied to OIP requests: mask PII in every text (BYTES)
input before any model sees it, count what was masked, and write an audit
record per request that carried text - with counts, never the raw values."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from cmesh.config import InputLimits
from cmesh.errors import InvalidInput
from cmesh.tensors import DEFAULT_LIMITS, check_shape
from protos import inference_pb2 as pb
from router.metrics import RouterMetrics
from router.trust import KINDS, build_audit_record
from cmesh.bytes_elements import Malformed
from router.trust_pool import MaskPool
from router.trust_worker import FUNCTIONS

log = logging.getLogger(__name__)

# Texts up to this size are masked on the event loop (about 3 ms at most); larger
# ones in the worker pool.
INLINE_BYTES = 16 * 1024


class AuditSink(Protocol):
    def write(self, record: dict) -> None: ...


class MemoryAudit:
    """The most recent records, for tests and `cmesh status`-style inspection."""

    def __init__(self, size: int = 10_000) -> None:
        self.records: deque[dict] = deque(maxlen=size)

    def write(self, record: dict) -> None:
        self.records.append(record)


class FileAudit(MemoryAudit):
    """Appends JSON lines; one short buffered write per request."""

    def __init__(self, path: str) -> None:
        super().__init__(size=1000)
        self._fh = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        super().write(record)
        with self._lock:
            self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")


class TrustLayer:
    """Masks the text inputs of every request (and, per model, the text outputs)
    under a size limit checked first; small texts inline, large ones in ``pool``."""

    def __init__(self, sink: AuditSink, metrics: RouterMetrics, limits: InputLimits = DEFAULT_LIMITS,
                 pool: MaskPool | None = None, *, inline_bytes: int = INLINE_BYTES,
                 wall: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.metrics = metrics
        self.limits = limits
        self.pool = pool
        self.inline_bytes = inline_bytes
        self._wall = wall

    async def apply(self, call, counts: list[int]) -> dict[str, int]:
        """Mask every text input of a ``router.call.Call`` in place; ``counts`` are the
        element counts that ``cmesh.tensors.check_request`` validated. Returns the
        masked counts per kind."""
        request = call.request
        inputs = request.inputs
        texts = [i for i in range(len(inputs)) if inputs[i].datatype == "BYTES"]
        if not texts:
            return {}
        raws = request.raw_input_contents
        # Each raw buffer read once: every read of a repeated bytes field is a copy.
        data = {i: raws[i] for i in texts} if raws else {}
        size = sum(len(d) for d in data.values()) if raws else \
            sum(request.inputs[i].contents.ByteSize() for i in texts)
        if size > self.limits.max_text_bytes:
            raise InvalidInput("inputs", f"{size} bytes of text exceed the trust layer's limit of "
                                         f"{self.limits.max_text_bytes} per request")
        totals: Counter = Counter()
        saw_text = False
        for i in texts:
            tensor = request.inputs[i]
            if raws:
                new, found, text = await self._run(size, tensor.name, "mask_raw", data[i], counts[i])
                if new is not None:
                    raws[i] = new
            else:
                new, found, text = await self._run(size, tensor.name, "mask_values",
                                                   list(tensor.contents.bytes_contents))
                if new is not None:
                    del tensor.contents.bytes_contents[:]
                    tensor.contents.bytes_contents.extend(new)
            totals.update(found)
            saw_text = saw_text or text
        if saw_text:
            self._account(call, totals)
        return dict(totals)

    async def mask_outputs(self, response: pb.ModelInferResponse, call,
                           fields: tuple[str, ...] = ()) -> dict[str, int]:
        """Mask the text outputs of a response (the model's ``trust.mask_outputs``)."""
        raws = response.raw_output_contents
        totals: Counter = Counter()
        size = sum(len(r) for r in raws)
        for i, tensor in enumerate(response.outputs):
            if tensor.datatype != "BYTES" or i >= len(raws):
                continue
            count = check_shape(tensor.name, tensor.shape, self.limits)
            new, found, _ = await self._run(size, tensor.name, "mask_raw", raws[i], count, fields)
            if new is not None:
                raws[i] = new
            totals.update(found)
        if sum(totals.values()):
            self._account(call, totals)
        return dict(totals)

    async def _run(self, size: int, tensor: str, name: str, *args):
        try:
            if size <= self.inline_bytes or self.pool is None:
                return FUNCTIONS[name](*args)
            return await self.pool.run(name, *args)
        except Malformed as exc:
            raise InvalidInput(tensor, str(exc)) from None

    def _account(self, call, totals: Counter) -> None:
        self.metrics.masked(totals)
        self.sink.write(build_audit_record(request_id=call.request_id, tenant=call.principal.tenant,
                                           model=call.model, pipeline=call.pipeline,
                                           counts={k: n for k, n in totals.items() if k in KINDS},
                                           timestamp=self._wall()))
