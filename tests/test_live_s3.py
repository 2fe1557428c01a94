"""Acceptance: push a version to S3 (moto's server), apply a config naming it, and
a replica started by the autoscaler loads it from s3:// through the store's cache
and answers with it, reporting the version it serves."""
import numpy as np
import yaml

from cmesh.cli import main
from cmesh.client import AsyncClient
from meshtest import free_port
from test_autoscaler_e2e import FAST, until
from test_live_config import _ready, live_mesh
from test_models_push import BUCKET, CREDENTIALS, _as_version, _option_flags, s3_endpoint  # noqa: F401

ORDER = np.array([b"Where is my order 1042?"], dtype=object)


async def test_push_then_apply_and_a_replica_serves_the_s3_version(s3_endpoint, demo_store, tmp_path,  # noqa: F811
                                                                  monkeypatch, capsys) -> None:
    src = _as_version(demo_store / "intent-classifier" / "1", tmp_path / "v2", "2")
    store = f"s3://{BUCKET}/live"
    assert main(["models", "push", str(src), "--model", "intent-classifier", "--version", "2",
                 "--store", store, *_option_flags(s3_endpoint)]) == 0
    pushed = f"{store}/intent-classifier/2"
    assert f"pushed {pushed}" in capsys.readouterr().out
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)           # the autoscaler's replicas read S3 as boto does
    port = free_port()
    data = {"store": str(demo_store), "server": {"drain_delay_s": 0.2, "drain_grace_s": 5},
            "autoscaler": {**FAST, "listen": f"127.0.0.1:{port}"},
            "router": {"autoscaler": f"127.0.0.1:{port}", "hold_timeout_s": 120},
            "models": {"intent": {"source": "store://intent-classifier/1",
                                  "deployment": {"mode": "serverless", "min_replicas": 1}}}}
    async with live_mesh(tmp_path, data) as (scaler, router, admin, _):
        await until(lambda: _ready(scaler, "intent", 1), "a replica of version 1", timeout=120)
        client = AsyncClient(f"127.0.0.1:{router.port}")
        first = await client.infer("intent", {"text": ORDER}, timeout=60)
        assert first.parameters["cmesh-source"] == "store://intent-classifier/1"
        data["models"]["intent"]["source"] = pushed
        resp = await admin.apply(yaml.safe_load(yaml.safe_dump(data)))
        assert resp.applied and [c.path for c in resp.changes] == ["models.intent.source"]

        async def serves_s3():
            answer = await client.infer("intent", {"text": ORDER}, timeout=60)
            return answer.parameters.get("cmesh-source") == pushed and answer
        answer = await until(serves_s3, "answers from the pushed version", timeout=120)
        assert answer.outputs["label"].reshape(-1)[0] == b"order_status"
        status = await scaler.status()
        (model,) = [m for m in status.models if m.model == "intent"]
        current = [r for r in model.replicas if r.config_id == resp.record.id]
        assert current and all(r.generation for r in current) and status.config_id == resp.record.id
        await client.close()
