"""Load reports are bounded and non-negative, or refused with INVALID_ARGUMENT naming
the field before any of them reaches the metrics window; Status never fails
because of what was reported. Pure checks, then the real Autoscaler service."""
import math

import grpc
import pytest

from autoscaler.controller import Controller
from autoscaler.reports import MAX_COUNT, MAX_VARIANT_ENTRIES, validate_report
from autoscaler.service import AutoscalerServicer
from cmesh.errors import InvalidInput, component_error_of
from cmesh.latency import N_BUCKETS
from cmesh.serving import grpc_server
from meshtest import IdleProvider, mesh_config, sleep_model
from protos import mesh_pb2, mesh_pb2_grpc

MODELS = {"embedder", "intent"}


def report(**load) -> mesh_pb2.LoadReport:
    r = mesh_pb2.LoadReport(source="router-1", timestamp_ms=1)
    r.models.add(model=load.pop("model", "embedder"), **load)
    return r


@pytest.mark.parametrize("load, field, rule", [
    ({"in_flight": -1}, "models[0].in_flight", "must be >= 0"),
    ({"in_flight": 2**63 - 1}, "models[0].in_flight", f"must be <= {MAX_COUNT}"),
    ({"queue_depth": MAX_COUNT + 1}, "models[0].queue_depth", f"must be <= {MAX_COUNT}"),
    ({"arrivals": -5}, "models[0].arrivals", "must be >= 0"),
    ({"load_seconds": math.nan}, "models[0].load_seconds", "must be finite"),
    ({"load_seconds": math.inf}, "models[0].load_seconds", "must be finite"),
    ({"model": "nope"}, "models[0].model", "unknown model 'nope'"),
])
def test_a_bad_value_is_named_by_its_field(load, field, rule) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_report(report(**load), MODELS)
    assert err.value.field == field and err.value.message.startswith(f"{field}: {rule}")


def test_held_duplicates_and_the_envelope_are_checked_too() -> None:
    r = report(in_flight=1)
    r.held["embedder"] = -1
    with pytest.raises(InvalidInput, match=r"held\['embedder'\]: must be >= 0"):
        validate_report(r, MODELS)
    r = report()
    r.held["ghost"] = 1
    with pytest.raises(InvalidInput, match=r"held\['ghost'\]: unknown model"):
        validate_report(r, MODELS)
    r = report()
    r.models.add(model="embedder")
    with pytest.raises(InvalidInput, match=r"models\[1\].model: 'embedder' is reported twice"):
        validate_report(r, MODELS)
    with pytest.raises(InvalidInput, match="timestamp_ms"):
        validate_report(mesh_pb2.LoadReport(timestamp_ms=-1), MODELS)
    with pytest.raises(InvalidInput, match="^source"):
        validate_report(mesh_pb2.LoadReport(source="s" * 1000), MODELS)
    # The bounds themselves are fine, and so is an empty report.
    validate_report(report(in_flight=MAX_COUNT, queue_depth=MAX_COUNT, arrivals=MAX_COUNT), MODELS)
    validate_report(mesh_pb2.LoadReport(), MODELS)


def variant_report(**load) -> mesh_pb2.LoadReport:
    """A router's report: the model's entry, then its per-variant figures."""
    r = report(in_flight=2)
    r.models.add(model=load.pop("model", "embedder"), variant=load.pop("variant", "default"), ready=True, **load)
    return r


@pytest.mark.parametrize("load, field, rule", [
    ({"answered": -1}, "models[1].answered", "must be >= 0"),
    ({"answered": 5, "failed": -1}, "models[1].failed", "must be >= 0"),
    ({"answered": MAX_COUNT + 1}, "models[1].answered", f"must be <= {MAX_COUNT}"),
    ({"answered": 3, "failed": 4}, "models[1].failed", "must be <= answered (3), got 4"),
    ({"answered": 10, "latency_counts": [1] * (N_BUCKETS + 1)}, "models[1].latency_counts",
     f"must have at most {N_BUCKETS} buckets, got {N_BUCKETS + 1}"),
    ({"answered": 10, "latency_counts": [1] * 2_000_000}, "models[1].latency_counts", "must have at most"),
    ({"answered": 10, "latency_counts": [2, -1]}, "models[1].latency_counts[1]", "must be >= 0"),
    ({"answered": 10, "failed": 4, "latency_counts": [3, 4]}, "models[1].latency_counts",
     "7 latencies counted for only 6 answers that did not fail"),
    ({"variant": "Bad Name!"}, "models[1].variant", "'Bad Name!' must match"),
    ({"model": "nope"}, "models[1].model", "unknown model 'nope'"),
])
def test_a_hostile_variant_entry_is_named_by_its_field(load, field, rule) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_report(variant_report(**load), MODELS)
    assert err.value.field == field and err.value.message.startswith(f"{field}: {rule}")


def test_variant_entries_are_checked_against_the_config_and_named_once(tmp_path) -> None:
    models = mesh_config(tmp_path, {
        "embedder": {"source": "store://e/1"},
        "intent": {"variants": {"a": {"source": "store://i/1"}, "b": {"source": "store://i/2"}}}}).models
    good = variant_report(answered=10, failed=2, latency_counts=[0, 5, 3])
    good.models.add(model="intent", in_flight=1)
    good.models.add(model="intent", variant="a", answered=4, latency_counts=[4] + [0] * (N_BUCKETS - 1))
    good.models.add(model="intent", variant="b")
    validate_report(good, models)                          # a model's entry and its variants' side by side
    validate_report(good, MODELS)                          # names only: the variants' shape is checked
    with pytest.raises(InvalidInput, match=r"^models\[1\].variant: model 'intent' has no variant 'c'"):
        validate_report(variant_report(model="intent", variant="c"), models)
    twice = variant_report(model="intent", variant="a")
    twice.models.add(model="intent", variant="a")
    with pytest.raises(InvalidInput, match=r"^models\[2\].variant: 'intent:a' is reported twice"):
        validate_report(twice, models)
    flood = mesh_pb2.LoadReport(models=[mesh_pb2.ModelLoad(model="embedder", variant=f"v{i}")
                                        for i in range(MAX_VARIANT_ENTRIES + 1)])
    with pytest.raises(InvalidInput, match=r"^models\[4096\].variant: more than 4096 per-variant entries"):
        validate_report(flood, MODELS)
    huge = mesh_pb2.LoadReport(models=[mesh_pb2.ModelLoad(model="embedder", variant=f"v{i}")
                                       for i in range(MAX_VARIANT_ENTRIES + 3)])
    with pytest.raises(InvalidInput, match=r"^models: 4099 entries"):
        validate_report(huge, MODELS)


@pytest.fixture()
async def autoscaler(tmp_path):
    config = mesh_config(tmp_path, {"embedder": {"source": sleep_model(tmp_path, "embedder")}})
    controller = Controller(config, IdleProvider())
    server = grpc_server(config)
    mesh_pb2_grpc.add_AutoscalerServicer_to_server(AutoscalerServicer(controller), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield mesh_pb2_grpc.AutoscalerStub(channel), controller
    await channel.close()
    await server.stop(None)


async def send(stub, *reports):
    async def stream():
        for r in reports:
            yield r
    return await stub.ReportLoad(stream(), timeout=5)


@pytest.mark.parametrize("load, field", [
    ({"in_flight": 2**63 - 1}, "models[0].in_flight"),
    ({"in_flight": -1}, "models[0].in_flight"),
    ({"queue_depth": 10**12}, "models[0].queue_depth"),
    ({"model": "not-in-config", "in_flight": 3}, "models[0].model"),
    ({"load_seconds": math.nan}, "models[0].load_seconds"),
])
async def test_the_service_refuses_the_stream_and_nothing_reaches_the_window(autoscaler, load, field) -> None:
    stub, controller = autoscaler
    good = report(in_flight=3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send(stub, good, report(**load))
    err = component_error_of(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith(field) and err.detail.field == field
    latest = controller.window.latest("embedder")
    assert latest is not None and latest["concurrency"] == 3       # the good report counted, the bad one not
    status = await stub.Status(mesh_pb2.StatusRequest(), timeout=5)   # never INTERNAL over reported values
    assert status.models[0].queue_depth == 3


async def test_valid_reports_are_acknowledged(autoscaler) -> None:
    stub, controller = autoscaler
    r = report(in_flight=MAX_COUNT, queue_depth=MAX_COUNT)
    r.held["embedder"] = MAX_COUNT
    await send(stub, r)
    status = await stub.Status(mesh_pb2.StatusRequest(), timeout=5)
    assert status.models[0].queue_depth == 2 * MAX_COUNT and status.models[0].held == MAX_COUNT
