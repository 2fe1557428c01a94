"""The trust layer applied to OIP requests: mask PII in every text (BYTES)
input before any model sees it, count what was masked, and write an audit
record per request that carried text - with counts, never the raw values."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from cmesh.errors import InvalidInput
from cmesh.tensors import deserialize_bytes, serialize_bytes
from protos import inference_pb2 as pb
from router.metrics import RouterMetrics
from router.trust import build_audit_record, mask_texts

log = logging.getLogger(__name__)


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
    def __init__(self, sink: AuditSink, metrics: RouterMetrics, wall: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.metrics = metrics
        self._wall = wall

    def apply(self, request: pb.ModelInferRequest, ctx, model: str) -> dict[str, int]:
        """Mask every text input in place; returns the counts per kind."""
        totals: dict[str, int] = {}
        saw_text = False
        raws = request.raw_input_contents
        for i, tensor in enumerate(request.inputs):
            if tensor.datatype != "BYTES":
                continue
            count = int(np.prod(tensor.shape)) if len(tensor.shape) else 1
            if raws:
                if i >= len(raws):
                    continue                        # malformed: the model server rejects it
                try:
                    values = deserialize_bytes(tensor.name, raws[i], count)
                except InvalidInput:
                    continue
            else:
                values = np.array(list(tensor.contents.bytes_contents), dtype=object)
            texts, positions = [], []
            for j, value in enumerate(values.reshape(-1)):
                try:
                    texts.append(bytes(value).decode("utf-8"))
                    positions.append(j)
                except UnicodeDecodeError:
                    continue                        # binary, not text
            if not texts:
                continue
            saw_text = True
            masked, counts = mask_texts(texts)
            for kind, n in counts.items():
                totals[kind] = totals.get(kind, 0) + n
            if not sum(counts.values()):
                continue
            flat = values.reshape(-1).copy()
            for j, text in zip(positions, masked):
                flat[j] = text.encode("utf-8")
            if raws:
                raws[i] = serialize_bytes(flat)
            else:
                del tensor.contents.bytes_contents[:]
                tensor.contents.bytes_contents.extend(list(flat))
        if saw_text:
            self.metrics.masked(totals)
            self.sink.write(build_audit_record(request_id=ctx.request_id, tenant=ctx.principal.tenant,
                                               model=model, pipeline=ctx.pipeline, counts=totals,
                                               timestamp=self._wall()))
        return totals
