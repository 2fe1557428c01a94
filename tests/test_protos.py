"""The committed stubs are exactly what `make protos` generates."""
from pathlib import Path

from meshtest import REPO
from protos.compile import SOURCES, compile_protos


def test_committed_stubs_match_regeneration(tmp_path: Path) -> None:
    compile_protos(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "protos").iterdir())
    stems = [s.removesuffix(".proto") for s in SOURCES]
    expected = sorted(f"{stem}{suffix}" for stem in stems
                      for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    assert generated == expected
    for name in generated:
        committed = (REPO / "protos" / name).read_text()
        assert committed == (tmp_path / "protos" / name).read_text(), \
            f"protos/{name} is stale: run `make protos` and commit the result"


def test_oip_field_numbers_match_the_published_protocol() -> None:
    """Spot-check the numbers tritonclient depends on."""
    from protos import inference_pb2 as pb

    req = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in req.items()} == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
        "outputs": 6, "raw_input_contents": 7}
    resp = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert resp["raw_output_contents"].number == 6 and resp["outputs"].number == 5
    param = pb.InferParameter.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in param.items()} == {
        "bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5}
    contents = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert contents["bytes_contents"].number == 8 and contents["fp32_contents"].number == 6
    stream = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name
    assert stream["error_message"].number == 1 and stream["infer_response"].number == 2
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad",
            "RepositoryModelUnload"} <= set(service.methods_by_name)
