"""``cmesh.v1.Admin``: operator calls served by the router.

Authorization is not checked here: the router's auth layer admits only callers
holding an admin key (``security.admin_keys_env``) to ``/cmesh.v1.Admin/*``
before any of these methods runs. This servicer stays thin (DESIGN.md §7):
request in, pure ``cmesh.cost`` logic over the meter's rows, response out. When
the meter spools (``router.meter_spool``), the report says how many events the
rows lack: spooled through a Redis outage, or dropped.
"""
from __future__ import annotations

from collections.abc import Callable

import grpc

from cmesh.config import MeshConfig
from cmesh.cost import GROUP_BY, build_report, report_to_proto
from cmesh.errors import InvalidInput, MeshError, abort_with
from protos import mesh_pb2, mesh_pb2_grpc
from router.meter_spool import Spooling
from router.metering import Meter

DEFAULT_GROUP_BY = "pipeline"


class AdminServicer(mesh_pb2_grpc.AdminServicer):
    """Admin RPCs. ``config`` is a MeshConfig or a callable returning the current
    one, so a config reload changes prices without rebuilding the servicer."""

    def __init__(self, meter: Meter, config: MeshConfig | Callable[[], MeshConfig]) -> None:
        self.meter = meter
        self._config = config if callable(config) else (lambda: config)

    async def CostReport(self, request: mesh_pb2.CostReportRequest,
                         context: grpc.aio.ServicerContext) -> mesh_pb2.CostReportResponse:
        # proto3 cannot tell "unset" from "": an unset group_by means the default.
        group_by = request.group_by or DEFAULT_GROUP_BY
        if group_by not in GROUP_BY:
            await abort_with(context, InvalidInput(
                "group_by", f"must be one of {', '.join(GROUP_BY)}; got {group_by!r}"))
            return mesh_pb2.CostReportResponse()   # not reached: abort_with raises
        # Read before the rows: an event replayed in between is then over-reported as
        # missing, never counted as neither present nor missing.
        spool = self.meter.spool_status() if isinstance(self.meter, Spooling) else None
        try:
            rows = await self.meter.rows()
        except MeshError as exc:             # e.g. Redis unreachable -> UNAVAILABLE
            await abort_with(context, exc)     # raises: the call ends here
            raise
        return report_to_proto(build_report(
            rows, self._config(), group_by, spooled_events=spool.depth if spool else 0,
            dropped_events=spool.dropped_total if spool else 0))
