"""The attempts stage: lease an endpoint from the model's dispatcher, send the call
through that endpoint's ``Backend``, and retry on a different endpoint while no
response has started and the retry budget allows. Replica failures feed outlier
ejection; the caller's own deadline running out is held against nobody.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from cmesh import wire
from cmesh.config import MeshConfig
from cmesh.errors import MeshError
from protos import inference_pb2 as pb
from router.backends import BackendError, Backends
from router.breaker import Verdict, classify
from router.call import Call
from router.dispatcher import Lease, ModelDispatcher, Ticket
from router.endpoints import EndpointTable
from router.metrics import RouterMetrics
from router.outlier import OutlierDetector
from router.retry import RetryPolicy

log = logging.getLogger(__name__)

# A replica timing out this close to the caller's deadline ran out of the caller's
# time, not its own: it is not held against the replica or the component.
DEADLINE_SLACK_S = 0.005


class Attempts:
    def __init__(self, config: MeshConfig, table: EndpointTable, backends: Backends, retry: RetryPolicy,
                 outliers: OutlierDetector, metrics: RouterMetrics, warm: Callable[[str], object],
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.table = table
        self.backends = backends
        self.retry = retry
        self.outliers = outliers
        self.metrics = metrics
        self._warm = warm
        self._now = clock
        self.dispatchers: dict[str, ModelDispatcher] = {}

    async def run(self, call: Call, variant: str) -> AsyncIterator[pb.ModelInferResponse]:
        model, request, acc = call.model, call.request, call.accounting
        dispatcher = self.dispatcher(model)
        self.retry.on_request(self._now())        # every request funds the retry budget
        exclude: frozenset[str] = frozenset()
        last_error: MeshError | None = None
        attempt = 0
        while True:
            lease: Lease = await dispatcher.acquire(Ticket(latency_class=call.latency_class, deadline=call.deadline,
                                                           variant=variant, exclude=exclude,
                                                           last_error=last_error))
            acc.attempts = attempt + 1
            acc.router_queue_ms = lease.queue_s * 1000.0
            acc.cold_start_ms = acc.router_queue_ms if lease.held else 0.0
            backend = self.backends.get(model, lease.replica)
            sent_at = self._now()
            remaining = call.deadline - sent_at
            wire.set_param(request.parameters, wire.P_TIMEOUT_MS, max(1, int(remaining * 1000)))
            started = False
            try:
                if call.streaming:
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
                                       and self._now() >= call.deadline - DEADLINE_SLACK_S)
                if not err.caller_deadline:
                    self._replica_failed(model, lease, err)
                decision = self.retry.decide(attempt=attempt + 1, code_name=err.code.name,
                                             response_started=err.started,
                                             remaining_s=call.deadline - self._now(), now=self._now(),
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

    @staticmethod
    def _stamp(response: pb.ModelInferResponse, lease: Lease, attempt: int) -> None:
        """Router-side timings for the caller's traces: queue wait, and how much of
        it was a cold start."""
        wire.set_ms(response.parameters, wire.P_ROUTER_QUEUE_MS, lease.queue_s * 1000.0)
        if lease.held:
            wire.set_ms(response.parameters, wire.P_COLD_START_MS, lease.queue_s * 1000.0)
        if attempt:
            wire.set_param(response.parameters, wire.P_ATTEMPTS, attempt + 1)

    def _external_compute(self, response: pb.ModelInferResponse, sent_at: float) -> None:
        """An external server that reports no compute is metered for its wall time,
        and the answer says it was external (the cost report marks it)."""
        params = response.parameters
        if wire.P_COMPUTE_MS not in params:
            wire.set_ms(params, wire.P_COMPUTE_MS, (self._now() - sent_at) * 1000.0)
        params[wire.P_EXTERNAL].bool_param = True

    def _replica_failed(self, model: str, lease: Lease, err: BackendError) -> None:
        if classify(err.code.name) is not Verdict.FAILURE:
            return
        now = self._now()
        pool_size = sum(1 for r in self.table.replicas(model) if r.pool == lease.replica.pool)
        if self.outliers.on_failure(lease.replica.id, now, pool_size, pool=f"{model}/{lease.replica.pool}"):
            self.metrics.ejected(model)
            log.warning("ejected replica %s of %s after repeated failures (%s)", lease.replica.address,
                        model, err.message)

    def apply(self, config: MeshConfig) -> None:
        """Dispatchers of models that stay keep their queues and in-flight counts and
        read the new spec (mode, threshold, caps) from their next decision on. A
        removed model's dispatcher stays to serve what it already holds (admission
        refuses new calls for it), and is reused if the model comes back."""
        self.config = config
        for model, dispatcher in self.dispatchers.items():
            spec = config.models.get(model)
            if spec is not None:
                dispatcher.config = spec
                dispatcher.on_table_change()          # a mode switch may change the choice now

    def dispatcher(self, model: str) -> ModelDispatcher:
        dispatcher = self.dispatchers.get(model)
        if dispatcher is None:
            dispatcher = ModelDispatcher(model, self.config.models[model], self.config.router, self.table,
                                         self.outliers, self.metrics, self._warm, clock=self._now)
            self.dispatchers[model] = dispatcher
        return dispatcher
