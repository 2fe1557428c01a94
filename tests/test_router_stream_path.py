"""The router's stream data path to one replica (router.backends.mesh.StreamPath) on a
real model server: many requests multiplexed on one bidi stream, and what is
left behind when that stream ends."""
import asyncio

import numpy as np
import pytest

from meshtest import mesh_config, running_server, sleep_model
from protos import inference_pb2 as pb
from router.backends.base import BackendError
from router.backends.mesh import StreamPath


def request(i: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="m", id=f"client-{i}")
    r.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(np.full((1, 4), i, dtype=np.float32).tobytes())
    return r


def stream_feeders() -> list[asyncio.Task]:
    """gRPC's tasks that feed a stream call from its request iterator."""
    return [t for t in asyncio.all_tasks() if not t.done() and "consume_request_iterator" in repr(t.get_coro())]


async def test_requests_share_one_stream_and_keep_their_ids(tmp_path) -> None:
    source = sleep_model(tmp_path, sleep_ms=5, max_batch_size=8)
    async with running_server(mesh_config(tmp_path, {"m": {"source": source}}), ["m"]) as server:
        path = StreamPath(f"127.0.0.1:{server.port}")
        try:
            answers = await asyncio.gather(*(path.call(request(i), 5.0) for i in range(40)))
            assert [a.id for a in answers] == [f"client-{i}" for i in range(40)]
            assert all(np.frombuffer(a.raw_output_contents[0], np.float32)[0] == i for i, a in enumerate(answers))
            assert len(stream_feeders()) == 1       # one stream carried all of them
        finally:
            await path.close()
        assert stream_feeders() == []


async def test_a_stream_the_replica_ends_leaves_no_task_behind(tmp_path) -> None:
    """The replica drains and goes: every request in flight is answered (drain
    finishes them), later ones fail with a reason, and gRPC's feeder task of the
    dead stream ends at once instead of lingering until garbage collection."""
    source = sleep_model(tmp_path, sleep_ms=20, max_batch_size=8)
    cfg = mesh_config(tmp_path, {"m": {"source": source}})
    # The open stream holds the drain for its grace period (routers close theirs
    # when the replica leaves their table); 1 s is plenty for 30 requests here.
    async with running_server(cfg, ["m"], grace_s=1.0) as server:
        path = StreamPath(f"127.0.0.1:{server.port}")
        in_flight = [asyncio.create_task(path.call(request(i), 5.0)) for i in range(30)]
        await asyncio.sleep(0.01)
    try:
        answers = await asyncio.gather(*in_flight)
        assert sorted(a.id for a in answers) == sorted(f"client-{i}" for i in range(30))
        for _ in range(50):                          # the stream's end reaches the reader
            if not stream_feeders():
                break
            await asyncio.sleep(0.02)
        assert stream_feeders() == []
        with pytest.raises(BackendError) as info:
            await path.call(request(99), 1.0)
        assert info.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    finally:
        await path.close()
    assert stream_feeders() == []
