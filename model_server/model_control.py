"""Repository load/unload on a replica is off unless ``server.model_control`` is
``explicit`` (Triton's ``--model-control-mode=none`` by default).

A replica serves the models it was started with; which models run where is the
autoscaler's decision, and one unauthenticated ``RepositoryModelUnload`` once took
the only intent-classifier out of service for good. With control off, both RPCs
answer FAILED_PRECONDITION: the server's configuration, not the caller's identity,
forbids them (so not PERMISSION_DENIED), and retrying cannot help (so not
UNAVAILABLE, which our clients retry). ``RepositoryIndex`` stays, as in Triton,
and so does the ``model_repository`` extension Triton advertises in every mode.
"""
from __future__ import annotations

from cmesh.errors import FailedPrecondition
from cmesh.rpc import guarded
from model_server.servicer import InferenceServicer


def disabled(rpc: str, model: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{rpc}: model control is off on this replica (server.model_control: none); the models it "
        "serves are fixed at start and the autoscaler replaces replicas instead. Set "
        "server.model_control: explicit in mesh.yaml to allow repository load/unload",
        component=model)


class FixedModelsServicer(InferenceServicer):
    """The OIP servicer with RepositoryModelLoad/Unload refused."""

    @guarded
    async def RepositoryModelLoad(self, request, context):
        raise disabled("RepositoryModelLoad", request.model_name)

    @guarded
    async def RepositoryModelUnload(self, request, context):
        raise disabled("RepositoryModelUnload", request.model_name)


def servicer_class(mode: str) -> type[InferenceServicer]:
    return InferenceServicer if mode == "explicit" else FixedModelsServicer
