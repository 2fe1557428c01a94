"""``/v1/embeddings``: a list of inputs as one call to an encoder (one batch on the
replica), vectors back as floats or as base64 of little-endian float32, as
OpenAI's clients decode them."""
from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np

from cmesh.client import build_request
from cmesh.errors import InvalidInput, NotFound, Unavailable, quote
from cmesh.tensors import decode_outputs
from router.openai.schema import EmbeddingRequest
from router.openai.shapes import usage
from router.servicer import require_public


class Embeddings:
    def __init__(self, core, door, manifests) -> None:
        self.core = core
        self.door = door
        self.manifests = manifests

    async def embed(self, md: Mapping[str, str], remaining: float | None, body: EmbeddingRequest) -> dict:
        model = body.model
        principal = self.door.auth.authenticate(md.get("authorization"))   # before anything is told
        if model not in self.core.config.models:
            raise NotFound(f"unknown model {quote(model)}", component=model)
        require_public(self.core.config, model)
        self.door.gate.check_model(principal, model)
        manifest = await self.manifests.get(model)
        out = manifest.outputs[0]
        if manifest.inputs[0].datatype != "BYTES" or out.datatype != "FP32" or len(out.shape) != 2:
            raise InvalidInput("model", f"{model!r} is not an embedding model (text in, FP32 [n, d] out)")
        texts = np.array([t.encode("utf-8") for t in body.texts], dtype=object)
        call = self.door.call_of(md, remaining, build_request(model, {manifest.inputs[0].name: texts}), principal)
        vectors = decode_outputs(await self.core.infer(call)).get(out.name)
        if vectors is None or vectors.ndim != 2 or len(vectors) != len(texts):
            raise Unavailable(f"{model!r} answered no [{len(texts)}, d] {out.name!r} output", component=model)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        acc = call.accounting
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {k: v for k, v in usage(acc.input_tokens, 0).items() if k != "completion_tokens"}}
