"""A streamed node inside a unary Pipelines.Run whose replica dies mid-stream is
retried: nothing of it had reached the caller, so the response had not started."""
from __future__ import annotations

import asyncio
import signal

import grpc

from meshtest import ServerProcess, identity_text_model, in_flight_address, mesh_config, running_router, running_server, write_config
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc


async def test_streamed_node_of_a_unary_run_is_retried_when_its_replica_dies(demo_store, tmp_path) -> None:
    cfg_path = write_config(tmp_path / "mesh.yaml", {"store": str(demo_store), "models": {
        "llm": {"source": "store://tiny-llm/1", "engine": "hf-causal-lm"}}})
    first, second = ServerProcess(cfg_path, ["llm"]), ServerProcess(cfg_path, ["llm"])
    try:
        cfg = mesh_config(demo_store, {"llm": {"source": "store://tiny-llm/1",
                                               "endpoints": [first.address, second.address]}},
                          pipelines={"chat": {"nodes": {"answer": {
                              "model": "llm", "stream": True,
                              "input": "f'Customer: {request.text}\\nAgent:'",
                              "params": {"max_tokens": 200, "temperature": 0.0}}}}},
                          router={"retry": {"min_retries_per_s": 50}})
        async with running_router(cfg) as router:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                stub = mesh_pb2_grpc.PipelinesStub(channel)
                async def run(i: int):
                    return await stub.Run(mesh_pb2.RunRequest(pipeline="chat", inputs={"text": f"hello {i}"}),
                                          timeout=120)

                runs = [asyncio.create_task(run(i)) for i in range(8)]
                victim = None
                for _ in range(2000):               # until a replica holds a request
                    busy = in_flight_address(router.core, "llm")
                    if busy is not None:
                        victim = first if busy == first.address else second
                        break
                    await asyncio.sleep(0.005)
                assert victim is not None
                victim.proc.send_signal(signal.SIGKILL)
                answers = await asyncio.gather(*runs, return_exceptions=True)
            failures = [a for a in answers if isinstance(a, Exception)]
            assert not failures, failures
            assert all(a.answer for a in answers)
            assert router.metrics.value("cmesh_router_retries_total", model="llm", code="UNAVAILABLE") >= 1
    finally:
        first.stop(timeout=10)
        second.stop(timeout=10)


class BreakingReplica(pb_grpc.GRPCInferenceServiceServicer):
    """Ends every stream the way a dying replica's connection can: UNKNOWN
    'Stream removed', after a request is already on it."""

    def __init__(self) -> None:
        self.received = 0

    async def ModelStreamInfer(self, request_iterator, context):
        async for _ in request_iterator:
            self.received += 1
            await context.abort(grpc.StatusCode.UNKNOWN, "Stream removed")
        yield pb.ModelStreamInferResponse()  # never reached


async def test_a_broken_stream_is_retried_before_anything_reached_the_caller(tmp_path) -> None:
    source = identity_text_model(tmp_path)
    breaking = BreakingReplica()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(breaking, server)
    bad_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with running_server(mesh_config(tmp_path, {"echo": {"source": source}}), ["echo"]) as good:
            cfg = mesh_config(tmp_path, {"echo": {"source": source, "deployment": {"max_inflight_per_replica": 1},
                                                  "endpoints": [f"127.0.0.1:{bad_port}",
                                                                f"127.0.0.1:{good.port}"]}},
                              pipelines={"say": {"nodes": {"out": {"model": "echo", "stream": True,
                                                                   "input": "request.text"}}}},
                              router={"retry": {"min_retries_per_s": 50}})
            async with running_router(cfg) as router:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                    stub = mesh_pb2_grpc.PipelinesStub(channel)
                    answers = await asyncio.gather(*[
                        stub.Run(mesh_pb2.RunRequest(pipeline="say", inputs={"text": f"hi {i}"}), timeout=30)
                        for i in range(6)])
                assert sorted(a.answer for a in answers) == sorted(f"hi {i}" for i in range(6))
                assert breaking.received >= 1
                assert router.metrics.value("cmesh_router_retries_total", model="echo", code="UNAVAILABLE") >= 1
    finally:
        await server.stop(None)
