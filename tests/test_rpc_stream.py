"""cmesh.rpc.serve_stream: many requests on one stream, each failure answered in place."""
import asyncio

from cmesh.errors import InvalidInput
from cmesh.rpc import serve_stream
from protos import inference_pb2 as pb


async def requests(n: int):
    for i in range(n):
        yield pb.ModelInferRequest(model_name="m", id=f"r{i}")
        await asyncio.sleep(0)


async def test_failures_are_answered_on_the_stream_and_spare_the_others() -> None:
    async def answer(request, emit):
        if request.id == "r1":
            raise InvalidInput("text", "element 0 is empty")
        if request.id == "r2":
            raise RuntimeError("boom")
        await emit(pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=request.id)))

    out = [r async for r in serve_stream(requests(4), answer)]
    by_id = {r.infer_response.id: r for r in out}
    assert sorted(by_id) == ["r0", "r1", "r2", "r3"]
    assert by_id["r0"].error_message == "" and by_id["r3"].error_message == ""
    assert by_id["r1"].error_message.startswith("INVALID_ARGUMENT:") and "text" in by_id["r1"].error_message
    assert by_id["r1"].infer_response.parameters["cmesh-error-field"].string_param == "text"
    assert by_id["r2"].error_message == "INTERNAL: internal error: boom"
    assert by_id["r2"].infer_response.parameters["triton_final_response"].bool_param
