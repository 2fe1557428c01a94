"""Pipeline traces as OpenTelemetry spans: one root span per run, a child per
executed node with its timing split, status and whether it was on the critical
path. The SDK (and, for OTLP, the exporter) are optional: only a config that
asks for tracing needs them."""
from __future__ import annotations

from cmesh.config import ObservabilityConfig
from cmesh.validation import ConfigError
from protos import mesh_pb2


class SpanExport:
    def __init__(self, config: ObservabilityConfig) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            raise ConfigError("observability.tracing", [
                "tracing needs the OpenTelemetry SDK: pip install 'cmesh[otel]'"]) from None
        self.memory = None
        if config.tracing == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ConfigError("observability.tracing", [
                    "otlp: pip install opentelemetry-exporter-otlp-proto-grpc (or 'cmesh[otel]')"]) from None
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True))
        elif config.tracing == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            processor = BatchSpanProcessor(ConsoleSpanExporter())
        else:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory = InMemorySpanExporter()
            processor = SimpleSpanProcessor(self.memory)
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("cmesh.pipelines")

    def export(self, trace: mesh_pb2.Trace, started_ns: int, status: str) -> None:
        """``started_ns``: wall-clock start of the run (the trace's times are relative)."""
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        def at(ms: float) -> int:
            return started_ns + int(ms * 1e6)

        root = self.tracer.start_span(f"pipeline {trace.pipeline}", start_time=started_ns, attributes={
            "cmesh.pipeline": trace.pipeline, "cmesh.request_id": trace.request_id,
            "cmesh.critical_path": " -> ".join(trace.critical_path)})
        if status != "OK":
            root.set_status(Status(StatusCode.ERROR, status))
        parent = set_span_in_context(root)
        for n in trace.nodes:
            if n.status == "skipped":
                continue
            span = self.tracer.start_span(f"node {n.node}", context=parent, start_time=at(n.start_ms), attributes={
                "cmesh.node": n.node, "cmesh.model": n.model_used or n.model, "cmesh.variant": n.variant,
                "cmesh.status": n.status, "cmesh.critical": n.critical, "cmesh.queue_ms": n.queue_ms,
                "cmesh.cold_start_ms": n.cold_start_ms, "cmesh.compute_ms": n.compute_ms,
                "cmesh.network_ms": n.network_ms, "cmesh.input_tokens": n.input_tokens,
                "cmesh.output_tokens": n.output_tokens})
            if n.status in ("failed", "degraded"):
                span.set_status(Status(StatusCode.ERROR, n.error))
            span.end(end_time=at(n.end_ms))
        root.end(end_time=at(trace.total_ms))

    def shutdown(self) -> None:
        self.provider.shutdown()
