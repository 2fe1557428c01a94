"""The Prediction Service's data plane, independent of gRPC and of transports.

For each call: pick the variant (sticky A/B), check the component's breaker,
mask PII (trust layer), queue in the model's dispatcher, send to the leased
endpoint through its ``Backend`` (``router.backends``: a mesh replica or any OIP
server, chosen per model), retry on a different endpoint while no response has
started and the budget allows, then meter the request exactly once by its
request id. Tests inject fake ``Backends`` (tests/fakes.py); nothing is patched.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import Counter
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from cmesh.config import MeshConfig
from cmesh import wire
from cmesh.errors import Internal, MeshError, NotFound, Unavailable, quote
from cmesh.internal_auth import MeshCredentials
from cmesh.tensors import check_request, decode_parameters, set_param
from protos import inference_pb2 as pb
from router.abtest import choose_variant, variant_weights
from router.auth import Principal
from router.breaker import BreakerRegistry, Verdict, classify
from router.dispatcher import Lease, ModelDispatcher, Ticket
from router.endpoints import EndpointTable
from router.metering import Meter, MeterEvent
from router.metrics import RouterMetrics
from router.outlier import OutlierDetector
from router.backends import Backends, BackendError, RouterBackends
from router.retry import RetryBudget, RetryPolicy
from router.trust_io import TrustLayer

log = logging.getLogger(__name__)

# Request parameters the router stamps on every call it forwards.
from cmesh.wire import (P_ATTEMPTS, P_CLASS, P_COLD_START_MS, P_COMPUTE_MS, P_INPUT_TOKENS,  # noqa: E402,F401
                        P_OUTPUT_TOKENS, P_PIPELINE, P_REQUEST_ID, P_ROUTER_QUEUE_MS, P_SESSION, P_TIMEOUT_MS)  # noqa: F401
# A replica timing out this close to the caller's deadline ran out of the caller's
# time, not its own: it is not held against the replica or the component.
DEADLINE_SLACK_S = 0.005


def _count(value, kind=int):
    """A replica-reported amount as a finite, non-negative number (0 when absent or bad)."""
    try:
        number = kind(value or 0)
    except (TypeError, ValueError):
        return kind(0)
    return number if number >= 0 and number == number and number != float("inf") else kind(0)


@dataclass
class CallContext:
    principal: Principal
    pipeline: str = ""
    latency_class: str = ""
    session: str = ""
    request_id: str = ""
    deadline: float = 0.0          # monotonic seconds
    params: dict | None = None     # the request's parameters, once decoded


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
        self._warm = warm
        self._now = clock
        self._wall = wall
        self._rng = rng or random.Random()
        rc = config.router
        self.breakers = BreakerRegistry(rc.breaker)
        self.outliers = OutlierDetector(rc.outlier)
        self.retry = RetryPolicy(rc.retry, RetryBudget.from_config(rc.retry, clock), rng=self._rng)
        self._dispatchers: dict[str, ModelDispatcher] = {}
        self._arrivals: Counter = Counter()          # per model, since the last load report
        self._meter_queue: asyncio.Queue[MeterEvent] = asyncio.Queue()
        # Request ids for calls that bring none: unique per router, cheaper than uuid4.
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)
        self._meter_task: asyncio.Task | None = None
        table.subscribe(self._on_table_change)

    # -- calls ----------------------------------------------------------------------

    async def infer(self, ctx: CallContext, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        final = None
        async for response in self._run(ctx, request, streaming=False):
            final = response
        assert final is not None
        return final

    def stream(self, ctx: CallContext, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        return self._run(ctx, request, streaming=True)

    async def _run(self, ctx: CallContext, request: pb.ModelInferRequest, *, streaming: bool
                   ) -> AsyncIterator[pb.ModelInferResponse]:
        model = request.model_name
        cfg = self.config.models.get(model)
        if cfg is None:
            raise NotFound(f"unknown model {quote(model)}", component=model, pipeline=ctx.pipeline)
        params = ctx.params if ctx.params is not None else decode_parameters(request.parameters)
        limit = self.config.server.limits.max_id_chars
        ctx.latency_class = wire.latency_class(ctx.latency_class or wire.text(P_CLASS, params.get(P_CLASS), limit)
                                               or cfg.latency_class)
        ctx.request_id = ctx.request_id or wire.text(P_REQUEST_ID, params.get(P_REQUEST_ID), limit) \
            or self._new_id()
        ctx.pipeline = ctx.pipeline or wire.text(P_PIPELINE, params.get(P_PIPELINE), limit)
        variants = cfg.variant_sources()
        # Salted by the model, so one session's draws in different experiments are independent.
        variant = request.model_version or choose_variant(
            variant_weights(cfg), ctx.session or None, self._rng, salt=model)
        if variant not in variants:
            raise NotFound(f"model {model!r} has no variant {quote(variant)}; variants: {sorted(variants)}",
                           component=model, pipeline=ctx.pipeline)
        component = f"{model}:{variant}"
        self._arrivals[model] += 1
        started_at = self._now()
        status, final = "OK", None
        try:
            # Every declared shape against the bytes present, before anything is
            # decoded or allocated; the caller's bad input never reaches the breaker.
            counts = check_request(request, self.config.server.limits)
        except MeshError as err:
            err.component, err.pipeline = component, ctx.pipeline
            self._record(ctx, model, variant, err.code.name, None, started_at)
            raise
        breaker = self.breakers.get(component)
        if not breaker.try_acquire(started_at):
            self.metrics.breaker(component, breaker.state(started_at))
            err = Unavailable(f"circuit breaker for {component} is open after repeated failures",
                              component=component, pipeline=ctx.pipeline,
                              retry_after_ms=breaker.retry_after_ms(started_at))
            err.reason = "breaker_open"
            self._record(ctx, model, variant, err.code.name, None, started_at)
            raise err
        outcome: str | None = None          # the replica's status code name, for the breaker
        try:
            await self.trust.apply(request, ctx, model, counts)
            request.model_version = variant
            for key, value in ((P_PIPELINE, ctx.pipeline), (P_CLASS, ctx.latency_class),
                               (P_REQUEST_ID, ctx.request_id)):
                set_param(request.parameters, key, value)
            trust = cfg.trust
            async for response in self._attempts(ctx, request, model, variant, streaming):
                if trust.mask_outputs or trust.redact_fields:
                    await self.trust.mask_outputs(response, ctx, model, tuple(trust.redact_fields))
                final = response
                yield response
            outcome = "OK"
        except BackendError as exc:
            status = exc.code.name
            # The caller's own deadline running out says nothing about the component.
            outcome = None if exc.caller_deadline else status
            exc.component, exc.pipeline = exc.component or component, ctx.pipeline
            raise
        except MeshError as exc:
            status = exc.code.name
            exc.component, exc.pipeline = exc.component or component, exc.pipeline or ctx.pipeline
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception:
            status = Internal.code.name      # a bug of ours: metered as what the caller sees
            raise
        finally:
            self._breaker_verdict(breaker, component, outcome)
            self._record(ctx, model, variant, status, final, started_at)

    async def _attempts(self, ctx: CallContext, request: pb.ModelInferRequest, model: str, variant: str,
                        streaming: bool) -> AsyncIterator[pb.ModelInferResponse]:
        dispatcher = self._dispatcher(model)
        self.retry.on_request(self._now())        # every request funds the retry budget
        exclude: frozenset[str] = frozenset()
        last_error: MeshError | None = None
        attempt = 0
        while True:
            lease: Lease = await dispatcher.acquire(Ticket(latency_class=ctx.latency_class, deadline=ctx.deadline,
                                                           variant=variant, exclude=exclude,
                                                           last_error=last_error))
            backend = self.backends.get(model, lease.replica)
            sent_at = self._now()
            remaining = ctx.deadline - sent_at
            set_param(request.parameters, P_TIMEOUT_MS, max(1, int(remaining * 1000)))
            started = False
            try:
                if streaming:
                    async for response in backend.stream(request, remaining):
                        if not started:
                            self._stamp(response, lease, attempt)
                        started = True
                        if backend.external and wire.is_final(response):
                            self._external_compute(response, sent_at)
                        yield response
                else:
                    response = await backend.call(request, remaining)
                    self._stamp(response, lease, attempt)
                    if backend.external:
                        self._external_compute(response, sent_at)
                    yield response
                self.outliers.on_success(lease.replica.id)
                return
            except BackendError as err:
                err.started = err.started or started
                err.caller_deadline = (err.code.name == "DEADLINE_EXCEEDED"
                                       and self._now() >= ctx.deadline - DEADLINE_SLACK_S)
                if not err.caller_deadline:
                    self._replica_failed(model, lease, err)
                decision = self.retry.decide(attempt=attempt + 1, code_name=err.code.name,
                                             response_started=err.started,
                                             remaining_s=ctx.deadline - self._now(), now=self._now(),
                                             reason=err.reason)
                if not decision.retry:
                    if attempt or err.retryable:
                        self.metrics.retry_denied(model, decision.reason)
                    raise
                self.metrics.retry(model, err.code.name)
                exclude = exclude | {lease.replica.id}
                last_error, attempt = err, attempt + 1
                if decision.backoff_s:
                    await asyncio.sleep(decision.backoff_s)
            finally:
                lease.release()

    # -- bookkeeping ----------------------------------------------------------------

    @staticmethod
    def _stamp(response: pb.ModelInferResponse, lease: Lease, attempt: int) -> None:
        """Router-side timings for traces: queue wait, and how much of it was a cold start."""
        wire.set_ms(response.parameters, P_ROUTER_QUEUE_MS, lease.queue_s * 1000.0)
        if lease.held:
            wire.set_ms(response.parameters, P_COLD_START_MS, lease.queue_s * 1000.0)
        if attempt:
            set_param(response.parameters, P_ATTEMPTS, attempt + 1)

    def _external_compute(self, response: pb.ModelInferResponse, sent_at: float) -> None:
        """An external server that reports no compute is metered for its wall time,
        and the answer says it was external (the cost report marks it)."""
        params = response.parameters
        if P_COMPUTE_MS not in params:
            wire.set_ms(params, P_COMPUTE_MS, (self._now() - sent_at) * 1000.0)
        params[wire.P_EXTERNAL].bool_param = True

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._id_counter):x}"

    def _replica_failed(self, model: str, lease: Lease, err: BackendError) -> None:
        if classify(err.code.name) is not Verdict.FAILURE:
            return
        now = self._now()
        pool_size = sum(1 for r in self.table.replicas(model) if r.pool == lease.replica.pool)
        if self.outliers.on_failure(lease.replica.id, now, pool_size, pool=f"{model}/{lease.replica.pool}"):
            self.metrics.ejected(model)
            log.warning("ejected replica %s of %s after repeated failures (%s)", lease.replica.address,
                        model, err.message)

    def _breaker_verdict(self, breaker, component: str, outcome: str | None) -> None:
        """Only what a replica answered judges the component (breaker.classify); errors
        of the router's own (queue full, no replica yet, deadline in queue) do not."""
        now = self._now()
        if outcome is None:
            breaker.release(now)
        else:
            breaker.on_outcome(now, outcome)
        self.metrics.breaker(component, breaker.state(now))

    def _record(self, ctx: CallContext, model: str, variant: str, status: str,
                final: pb.ModelInferResponse | None, started_at: float) -> None:
        self.metrics.request(model, variant, ctx.latency_class or "interactive", status,
                             self._now() - started_at)
        params = decode_parameters(final.parameters) if final is not None else {}
        try:
            event = MeterEvent(request_id=ctx.request_id or self._new_id(), tenant=ctx.principal.tenant,
                               pipeline=ctx.pipeline, model=model, variant=variant,
                               latency_class=ctx.latency_class or "interactive", status=status,
                               input_tokens=_count(params.get(P_INPUT_TOKENS)),
                               output_tokens=_count(params.get(P_OUTPUT_TOKENS)),
                               compute_s=wire.ms(params.get(P_COMPUTE_MS)) / 1000.0,
                               external=params.get(wire.P_EXTERNAL) is True,
                               timestamp=self._wall())
        except ValueError as exc:       # a replica's bad accounting must not fail the request
            log.error("cannot meter %s: %s", ctx.request_id, exc)
            return
        # One consumer records events off the hot path; the request never waits on it.
        self._meter_queue.put_nowait(event)
        if self._meter_task is None or self._meter_task.done():
            self._meter_task = asyncio.get_running_loop().create_task(self._meter_loop(), name="metering")

    async def _meter_loop(self) -> None:
        while True:
            event = await self._meter_queue.get()
            try:
                await self.meter.record(event)
            except (MeshError, ValueError) as exc:   # metering must never fail what it meters
                log.error("metering failed for %s: %s", event.request_id, exc)
            finally:
                self._meter_queue.task_done()

    async def flush_metering(self) -> None:
        """Wait until every event so far is recorded."""
        await self._meter_queue.join()

    def _dispatcher(self, model: str) -> ModelDispatcher:
        dispatcher = self._dispatchers.get(model)
        if dispatcher is None:
            dispatcher = ModelDispatcher(model, self.config.models[model], self.config.router, self.table,
                                         self.outliers, self.metrics, self._warm, clock=self._now)
            self._dispatchers[model] = dispatcher
        return dispatcher

    def _on_table_change(self, changed: set[str]) -> None:
        # An endpoint that left the table (draining) finishes what is in flight, then closes.
        self.backends.retire(self.table.addresses())
        for model in changed:
            if model in self._dispatchers:
                self._dispatchers[model].on_table_change()

    @property
    def dispatchers(self) -> dict[str, ModelDispatcher]:
        return self._dispatchers

    def take_arrivals(self) -> Counter:
        """Arrivals per model since the previous call (for load reports)."""
        arrivals, self._arrivals = self._arrivals, Counter()
        return arrivals

    def in_flight_address(self, model: str) -> str | None:
        """The address of a replica now serving a request of the model, if any."""
        dispatcher = self._dispatchers.get(model)
        busy = {rid for rid, n in (dispatcher.in_flight.items() if dispatcher else ()) if n}
        return next((r.address for r in self.table.replicas(model) if r.id in busy), None)

    def replica_address(self, model: str) -> str | None:
        """Any ready endpoint of the model (metadata calls are forwarded to it)."""
        for r in self.table.replicas(model):
            if r.state == "ready":
                return r.address
        return None

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

    async def close(self) -> None:
        await self.flush_metering()
        if self._meter_task is not None:
            self._meter_task.cancel()
        for dispatcher in self._dispatchers.values():
            await dispatcher.close()
        await self.backends.close()
        if self.trust.pool is not None:
            self.trust.pool.close()
