"""How a pipeline node calls a model: through the router core, like any client.

So every node call gets the router's queueing by latency class, spill-over,
breakers, retries and metering - attributed to the pipeline, once per node (each
node has its own request id, ``<request id>/<node>``).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from cmesh.client import build_request
from cmesh.config import NodeConfig
from cmesh.errors import InvalidInput
from cmesh.expr import ExprError, evaluate, parse
from cmesh.pipeline_check import render_params
from cmesh.manifest import Manifest
from router.manifests import ManifestCache
from cmesh.tensors import decode_outputs, output_texts
from router.auth import Principal
from router.call import Call
from router.core import RouterCore
from router.pipelines.values import from_outputs, to_tensor


class NodeCaller:
    def __init__(self, core: RouterCore, manifests: ManifestCache, *, pipeline: str, latency_class: str,
                 principal: Principal, request_id: str, session: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.manifests = manifests
        self.pipeline = pipeline
        self.latency_class = latency_class
        self.principal = principal
        self.request_id = request_id
        self.session = session
        self._now = clock

    async def __call__(self, node: str, config: NodeConfig, model: str, env: dict[str, Any], deadline: float,
                       on_token: Callable[[str], Any] | None = None):
        from router.pipelines.executor import NodeResult

        manifest = await self.manifests.get(model)
        inputs = node_inputs(node, config, manifest, env, self.pipeline)
        try:
            params = render_params(config.params, env)     # every string inside, nested too
        except ExprError as exc:
            raise InvalidInput("params", str(exc), node=node, pipeline=self.pipeline) from None
        # The node's own parameters go to the model; the call's ids, class and
        # deadline are typed fields the core never parses back out of them.
        call = Call(principal=self.principal, model=model, request=build_request(model, inputs, parameters=params),
                    deadline=deadline, request_id=f"{self.request_id}/{node}", latency_class=self.latency_class,
                    pipeline=self.pipeline, session=self.session)
        pieces: list[str] = []
        if on_token is not None:
            async for response in self.core.stream(call):
                for text in output_texts(response):
                    pieces.append(text)
                    result = on_token(text)
                    if asyncio.iscoroutine(result):
                        await result
            outputs = {manifest.outputs[0].name: "".join(pieces), "output": "".join(pieces)}
        else:
            outputs = from_outputs(decode_outputs(await self.core.infer(call)))
        acc = call.accounting        # decoded once by the core, also what it metered
        return NodeResult(outputs=outputs, queue_ms=max(0.0, acc.router_queue_ms - acc.cold_start_ms + acc.queue_ms),
                          cold_start_ms=acc.cold_start_ms, compute_ms=acc.compute_ms,
                          input_tokens=acc.input_tokens, output_tokens=acc.output_tokens,
                          variant=acc.variant, model_used=model)


def node_inputs(node: str, config: NodeConfig, manifest: Manifest, env: dict[str, Any], pipeline: str) -> dict:
    """A node's input tensors: its ``input`` expressions evaluated on ``env``
    (``request`` and the ancestors' outputs) and typed by the model's manifest.
    The router's node calls and ``cmesh profile`` (``sim.measure``: a model
    measured with what its pipeline sends it) both build them here."""
    specs = {s.name: s for s in manifest.inputs}
    if isinstance(config.input, dict):
        raw = {name: _value(node, f"input.{name}", expr, env, pipeline) for name, expr in config.input.items()}
    elif config.input is not None:
        raw = {manifest.inputs[0].name: _value(node, "input", config.input, env, pipeline)}
    else:
        raw = {manifest.inputs[0].name: env["request"].get("text")}
    tensors = {}
    for name, value in raw.items():
        if name not in specs:
            raise InvalidInput(f"input.{name}", f"model {config.model!r} has no input {name!r}; it takes "
                                                f"{sorted(specs)}", node=node, pipeline=pipeline)
        if value is None and specs[name].optional:
            continue
        tensors[name] = to_tensor(specs[name], value, node=node, pipeline=pipeline)
    return tensors


def _value(node: str, field: str, expr: Any, env: dict[str, Any], pipeline: str) -> Any:
    if not isinstance(expr, str):
        return expr                          # a literal from YAML (number, bool)
    try:
        return evaluate(parse(expr), env)
    except ExprError as exc:
        raise InvalidInput(field, str(exc), node=node, pipeline=pipeline) from None
