"""What every cmesh servicer shares: the one exception-to-status mapping, and
serving a ModelStreamInfer stream (its errors are coded by ``cmesh.wire``)."""
from __future__ import annotations

import asyncio
import functools
import logging

from cmesh.decoding import Undecodable
from cmesh.errors import Internal, MeshError, abort_with
from cmesh.wire import stream_error
from protos import inference_pb2 as pb

log = logging.getLogger(__name__)


def guarded(method):
    """MeshError keeps its code and detail; anything unexpected becomes INTERNAL
    with a message, never UNKNOWN."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except MeshError as exc:
            await abort_with(context, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("unexpected error in %s", method.__name__)
            await abort_with(context, Internal(f"internal error: {type(exc).__name__}: {exc}"))

    return wrapper


async def serve_stream(request_iterator, answer, what: str = "stream request"):
    """Run ``answer(request, emit)`` concurrently for every request on a stream and
    yield what they emit, until the client closes its side and all are answered.
    A request that fails is answered on the stream with its error (anything not a
    MeshError as INTERNAL) and never ends the stream for the others."""
    out: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def run(request: pb.ModelInferRequest) -> None:
        try:
            await answer(request, out.put)
        except MeshError as exc:
            await out.put(stream_error(request, exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("unexpected error in %s", what)
            await out.put(stream_error(request, Internal(f"internal error: {exc}")))

    async def read() -> None:
        async for request in request_iterator:
            if isinstance(request, Undecodable):      # answered on the stream; the rest go on
                await out.put(stream_error(request, request.as_error()))
                continue
            task = asyncio.create_task(run(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        await out.put(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await out.get()) is not None:
            yield item
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
