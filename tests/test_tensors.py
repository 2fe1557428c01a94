"""OIP tensor codec: both wire forms decode; malformed tensors name the input."""
import numpy as np
import pytest

from cmesh import tensors
from cmesh.errors import InvalidInput
from protos import inference_pb2 as pb


def roundtrip(inputs: dict) -> dict:
    req = pb.ModelInferRequest(model_name="m")
    tensors.encode_inputs(req, inputs)
    return tensors.decode_inputs(pb.ModelInferRequest.FromString(req.SerializeToString()))


def test_raw_roundtrip_numeric_and_bytes() -> None:
    out = roundtrip({"x": np.arange(6, dtype=np.float32).reshape(2, 3),
                     "t": np.array(["héllo", "", "z"], dtype=object)})
    assert out["x"].dtype == np.float32 and out["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["t"].tolist() == ["héllo".encode(), b"", b"z"]


def test_typed_contents_decode() -> None:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype="INT64", shape=[2])
    t.contents.int64_contents.extend([7, 8])
    assert tensors.decode_inputs(req)["x"].tolist() == [7, 8]


@pytest.mark.parametrize("mutate, field, message", [
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), "x", "needs 12 bytes, got 8"),
    (lambda r: setattr(r.inputs[0], "datatype", "COMPLEX"), "x", "unsupported datatype"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -2), "x", "negative dimension"),
    (lambda r: r.raw_input_contents.append(b"extra"), "raw_input_contents", "2 raw buffers for 1 inputs"),
])
def test_malformed_raw_tensors(mutate, field, message) -> None:
    req = pb.ModelInferRequest(model_name="m")
    tensors.encode_inputs(req, {"x": np.zeros(2, dtype=np.float32)})
    mutate(req)
    with pytest.raises(InvalidInput) as info:
        tensors.decode_inputs(req)
    assert info.value.field == field and message in info.value.message


def test_truncated_bytes_and_duplicates() -> None:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="t", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(tensors.serialize_bytes(np.array([b"only-one"], dtype=object)))
    with pytest.raises(InvalidInput, match="t: BYTES data holds fewer"):
        tensors.decode_inputs(req)
    dup = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        dup.inputs.add(name="x", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    with pytest.raises(InvalidInput, match="x: input given twice"):
        tensors.decode_inputs(dup)


def test_parameters_roundtrip() -> None:
    resp = pb.ModelInferResponse()
    for key, value in {"b": True, "i": 3, "f": 1.5, "s": "x"}.items():
        tensors.set_param(resp.parameters, key, value)
    assert tensors.decode_parameters(resp.parameters) == {"b": True, "i": 3, "f": 1.5, "s": "x"}


def test_a_huge_dimension_beside_a_zero_is_refused_by_name() -> None:
    # [0, 2, 2**62] holds no element, but no array can have that shape: INVALID_ARGUMENT,
    # never the INTERNAL of numpy's "array is too big" (found by tests/test_fuzz_hostile.py).
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="BOOL", shape=[0, 2, 2**62])
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput) as err:
        tensors.decode_inputs(request)
    assert err.value.field == "x" and "a dimension of 4611686018427387904" in err.value.message
