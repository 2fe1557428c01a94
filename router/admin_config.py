"""The Admin calls that change or show the mesh's config: apply (with dry run and
rollback), history, rollout status. The router forwards them to the autoscaler,
the config's one writer (``autoscaler.live``), naming the admin key that asked
(its id, never the key), and answers an apply once this router follows it.
"""
from __future__ import annotations

import grpc

from cmesh.errors import FailedPrecondition, InvalidInput, MeshError, NotFound, Unavailable, component_error_of
from protos import mesh_pb2, mesh_pb2_grpc
from router.auth import Principal
from router.live import ConfigFollower

FORWARD_TIMEOUT_S = 30.0        # validation and the history write; replicas roll out afterwards
FOLLOW_TIMEOUT_S = 10.0


class ConfigAdmin:
    def __init__(self, channel: grpc.aio.Channel | None, follower: ConfigFollower) -> None:
        self.stub = mesh_pb2_grpc.AutoscalerStub(channel) if channel is not None else None
        self.follower = follower

    async def apply(self, request: mesh_pb2.ApplyConfigRequest, principal: Principal) -> mesh_pb2.ApplyConfigResponse:
        forward = mesh_pb2.ApplyConfigRequest(yaml=request.yaml, dry_run=request.dry_run, rollback=request.rollback,
                                              applied_by=principal.key_id or principal.tenant, source="apply")
        resp = await self._call("ApplyConfig", forward)
        if resp.applied:
            resp.followed = await self.follower.wait_for(resp.record.id, FOLLOW_TIMEOUT_S)
        else:
            resp.followed = self.follower.config_id == resp.record.id
        return resp

    async def reload(self, text: str, router_id: str) -> mesh_pb2.ApplyConfigResponse:
        """SIGHUP: this router's file, applied as the operator's would be."""
        return await self._call("ApplyConfig", mesh_pb2.ApplyConfigRequest(
            yaml=text, applied_by=f"sighup:{router_id}", source="sighup"))

    async def history(self, request: mesh_pb2.ConfigHistoryRequest) -> mesh_pb2.ConfigHistoryResponse:
        return await self._call("ConfigHistory", request)

    async def rollouts(self, request: mesh_pb2.RolloutStatusRequest) -> mesh_pb2.RolloutStatusResponse:
        return await self._call("RolloutStatus", request)

    async def _call(self, method: str, request):
        if self.stub is None:
            raise FailedPrecondition("this router has static endpoints and no autoscaler to apply configs "
                                     "through: edit its file and send it SIGHUP")
        try:
            return await getattr(self.stub, method)(request, timeout=FORWARD_TIMEOUT_S, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            raise forwarded(exc) from None


def forwarded(exc: grpc.aio.AioRpcError) -> MeshError:
    """The autoscaler's refusal, as the caller's error with its code and message."""
    remote = component_error_of(exc)
    field = remote.detail.field if remote.detail else ""
    if remote.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(field or "yaml", remote.message.removeprefix(f"{field}: ") if field else remote.message)
    if remote.code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(remote.message)
    if remote.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(remote.message)
    return Unavailable(f"the autoscaler did not answer: {remote.code.name}: {remote.message}")
