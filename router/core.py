"""The Prediction Service's data plane, independent of gRPC and of transports.

A front door (``router.servicer.FrontDoor``, a pipeline node) hands the core a
typed ``Call``, decoded and validated once. The core runs it through its stages
in order (``router.stages``): admission → A/B variant → breaker → trust layer
(``router.trust_io``) → attempts through the leased endpoint's ``Backend``
(``router.attempts``; a mesh replica or any OIP server, chosen per model) →
metering, exactly once per request id. Tests inject fake ``Backends``
(tests/fakes.py); nothing is patched.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

from cmesh import wire
from cmesh.config import MeshConfig
from cmesh.errors import Internal, MeshError
from cmesh.internal_auth import MeshCredentials
from protos import inference_pb2 as pb
from router.attempts import Attempts
from router.backends import BackendError, Backends, RouterBackends
from router.breaker import BreakerRegistry
from router.call import Call
from router.dispatcher import ModelDispatcher
from router.endpoints import EndpointTable
from router.metering import Meter
from router.metrics import RouterMetrics
from router.outlier import OutlierDetector
from router.retry import RetryBudget, RetryPolicy
from router.stages import Admission, Breakers, Metering, Variants
from router.trust_io import TrustLayer

log = logging.getLogger(__name__)


class RouterCore:
    def __init__(self, config: MeshConfig, table: EndpointTable, meter: Meter, metrics: RouterMetrics,
                 warm: Callable[[str], "asyncio.Future | object"], trust: TrustLayer,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, credentials: MeshCredentials | None = None,
                 backends: Backends | None = None) -> None:
        self.config = config
        # What replica channels present: TLS settings and the mesh-internal token.
        self.credentials = credentials or MeshCredentials(config.security.client_tls)
        self.backends = backends or RouterBackends(config, self.credentials)
        self.table = table
        self.meter = meter
        self.metrics = metrics
        self.trust = trust
        self._now = clock
        rng = rng or random.Random()
        rc = config.router
        self.outliers = OutlierDetector(rc.outlier)
        self.admission = Admission(config)
        self.variants = Variants(config, rng)
        self.breakers = Breakers(BreakerRegistry(rc.breaker), metrics, clock)
        self.attempts = Attempts(config, table, self.backends,
                                 RetryPolicy(rc.retry, RetryBudget.from_config(rc.retry, clock), rng=rng),
                                 self.outliers, metrics, warm, clock)
        self.metering = Metering(meter, metrics, clock, wall)
        table.subscribe(self._on_table_change)

    # -- calls ----------------------------------------------------------------------

    async def infer(self, call: Call) -> pb.ModelInferResponse:
        call.streaming = False
        final = None
        async for response in self._run(call):
            final = response
        assert final is not None
        return final

    def stream(self, call: Call) -> AsyncIterator[pb.ModelInferResponse]:
        call.streaming = True
        return self._run(call)

    async def _run(self, call: Call) -> AsyncIterator[pb.ModelInferResponse]:
        cfg = self.admission.model(call)        # unknown models: nothing to attribute or meter
        started_at = self._now()
        status, final = "OK", None
        component, breaker = call.model, None
        outcome: str | None = None              # what the backend answered, for the breaker
        try:
            counts = self.admission.check(call)
            variant = self.variants.pick(call)
            component = f"{call.model}:{variant}"
            breaker = self.breakers.enter(component, call)
            await self.trust.apply(call, counts)
            self._outbound(call, variant)
            trust = cfg.trust
            async for response in self.attempts.run(call, variant):
                if trust.mask_outputs or trust.redact_fields:
                    await self.trust.mask_outputs(response, call, tuple(trust.redact_fields))
                final = response
                yield response
            outcome = "OK"
        except BackendError as exc:
            status = exc.code.name
            # The caller's own deadline running out says nothing about the component.
            outcome = None if exc.caller_deadline else status
            exc.component, exc.pipeline = exc.component or component, call.pipeline
            raise
        except MeshError as exc:
            status = exc.code.name
            exc.component, exc.pipeline = exc.component or component, exc.pipeline or call.pipeline
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception:
            status = Internal.code.name      # a bug of ours: metered as what the caller sees
            raise
        finally:
            if breaker is not None:
                self.breakers.verdict(breaker, component, outcome)
            if final is not None:
                call.accounting.read_answer(final)
            self.metering.record(call, status, started_at,
                                 judged=outcome is not None or status != "DEADLINE_EXCEEDED")

    @staticmethod
    def _outbound(call: Call, variant: str) -> None:
        """What every backend is told about the call (the attempts stage adds the
        remaining deadline per attempt)."""
        request = call.request
        request.model_version = variant
        params = request.parameters
        for key, value in ((wire.P_PIPELINE, call.pipeline), (wire.P_CLASS, call.latency_class),
                           (wire.P_REQUEST_ID, call.request_id)):
            wire.set_param(params, key, value)

    # -- live configuration -----------------------------------------------------------

    def apply(self, config: MeshConfig) -> None:
        """Swap in an applied config (``router.live``). What carries state keeps it:
        dispatchers (queues, in-flight counts) of models that stay, breakers,
        outlier records, the retry budget, metering. Calls already past admission
        finish on the config they started with."""
        self.config = config
        rc = config.router
        self.admission.config = config
        self.variants.apply(config)
        self.breakers.registry.apply(rc.breaker)
        self.outliers.config = rc.outlier
        self.attempts.retry.config = rc.retry
        self.trust.limits = config.server.limits
        self.backends.apply(config)
        self.attempts.apply(config)

    # -- readiness and metadata -------------------------------------------------------

    async def ready(self, model: str, version: str = "") -> bool:
        """Mesh models are servable with no replica (the router holds the call and
        the autoscaler warms one); an external model is ready when one of its
        endpoints says so through its backend."""
        cfg = self.config.models.get(model)
        if cfg is None:
            return False
        if not cfg.external:
            return True
        for replica in self.table.replicas(model):
            try:
                if await self.backends.get(model, replica).ready(model, version):
                    return True
            except MeshError as exc:
                log.info("readiness of %s at %s failed (%s)", model, replica.address, exc.code.name)
        return False

    async def describe(self, model: str, version: str = "") -> pb.ModelMetadataResponse | None:
        """The model's metadata from a ready endpoint through its backend; None when
        it has none or none answers (the caller falls back to the store)."""
        for replica in self.table.replicas(model):
            if replica.state != "ready":
                continue
            try:
                return await self.backends.get(model, replica).metadata(model, version)
            except MeshError as exc:
                log.info("metadata of %s from %s failed (%s)", model, replica.address, exc.code.name)
        return None

    # -- bookkeeping ----------------------------------------------------------------

    def _on_table_change(self, changed: set[str]) -> None:
        # An endpoint that left the table (draining) finishes what is in flight, then closes.
        self.backends.retire(self.table.addresses())
        for model in changed:
            if model in self.attempts.dispatchers:
                self.attempts.dispatchers[model].on_table_change()

    @property
    def dispatchers(self) -> dict[str, ModelDispatcher]:
        return self.attempts.dispatchers

    def take_arrivals(self) -> Counter:
        """Arrivals per model since the previous call (for load reports)."""
        return self.admission.take_arrivals()

    async def flush_metering(self) -> None:
        """Wait until every event so far is recorded."""
        await self.metering.flush()

    async def close(self) -> None:
        await self.metering.flush()
        self.metering.close()
        for dispatcher in self.attempts.dispatchers.values():
            await dispatcher.close()
        await self.backends.close()
        if self.trust.pool is not None:
            self.trust.pool.close()
