"""PipelineExecutor with fake model calls: real (short) asyncio sleeps, an injected
monotonic clock, and assertions on the trace's intervals, never on wall time."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
import pytest

from cmesh.config import NodeConfig, PipelineConfig
from cmesh.errors import (DeadlineExceeded, Internal, InvalidInput, MeshError, ResourceExhausted,
                          Unavailable)
from protos import mesh_pb2
from router.pipelines import NodeResult, PipelineExecutor, PipelineGraph
from router.pipelines.trace import build_trace, critical_path, node_trace, share_of_critical_path


class Clock:
    """Monotonic seconds, offset far from the event loop's clock so that mixing the
    two up breaks the tests; ``skip`` jumps ahead (a stall the loop never saw)."""

    def __init__(self) -> None:
        self.offset = 10_000.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Call:
    node: str
    model: str
    env: dict[str, Any]
    deadline: float
    on_token: Callable[[str], Awaitable[None]] | None
    at: float


Behaviour = Callable[[Call], Awaitable[NodeResult]]


@dataclass
class FakeModels:
    """The injected call_node: a behaviour per model name, and a record of calls."""

    clock: Clock
    behaviours: dict[str, Behaviour]
    calls: list[Call] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def __call__(self, node: str, cfg: NodeConfig, model: str, env: dict[str, Any],
                       deadline: float, on_token) -> NodeResult:
        call = Call(node, model, env, deadline, on_token, self.clock())
        self.calls.append(call)
        try:
            return await self.behaviours[model](call)
        except asyncio.CancelledError:
            self.cancelled.append(node)
            raise

    def called(self, model: str) -> list[Call]:
        return [c for c in self.calls if c.model == model]


def ok(ms: float = 10, **outputs: Any) -> Behaviour:
    async def run(call: Call) -> NodeResult:
        await asyncio.sleep(ms / 1000)
        return NodeResult(outputs=outputs or {"output": f"{call.model} says hi"},
                          queue_ms=1.0, compute_ms=ms / 2, variant="a", replica="r1")
    return run


def fail(err: Exception, ms: float = 5) -> Behaviour:
    async def run(call: Call) -> NodeResult:
        await asyncio.sleep(ms / 1000)
        raise err
    return run


def hang() -> Behaviour:
    async def run(call: Call) -> NodeResult:
        await asyncio.sleep(30)
        raise AssertionError("should have been cancelled")
    return run


def breaker_open(model: str) -> Unavailable:
    err = Unavailable(f"circuit breaker for {model}:a is open", component=f"{model}:a")
    err.reason = "breaker_open"
    return err


@dataclass
class Run:
    outcome: Any
    models: FakeModels
    events: list[mesh_pb2.RunEvent]

    def span(self, node: str) -> mesh_pb2.NodeTrace:
        return next(n for n in self.outcome.trace.nodes if n.node == node)


async def run(spec: dict, behaviours: dict[str, Behaviour], *, request: dict | None = None,
              budget_s: float = 5.0, stream: bool = False, clock: Clock | None = None,
              name: str = "p", sink: str = "async") -> Run:
    clock = clock or Clock()
    models = FakeModels(clock, behaviours)
    graph = PipelineGraph.build(name, PipelineConfig.model_validate(spec))
    executor = PipelineExecutor(graph, models, clock)
    events: list[mesh_pb2.RunEvent] = []

    async def async_sink(event: mesh_pb2.RunEvent) -> None:
        events.append(event)

    outcome = await executor.run(request or {"text": "where is my order 42?"}, clock() + budget_s,
                                 async_sink if sink == "async" else events.append, stream=stream)
    return Run(outcome, models, events)


async def run_fails(spec: dict, behaviours: dict[str, Behaviour], expected: type[MeshError], **kw
                    ) -> tuple[MeshError, FakeModels, list[mesh_pb2.RunEvent]]:
    clock = kw.pop("clock", None) or Clock()
    models = FakeModels(clock, behaviours)
    graph = PipelineGraph.build(kw.pop("name", "p"), PipelineConfig.model_validate(spec))
    events: list[mesh_pb2.RunEvent] = []
    with pytest.raises(expected) as info:
        await PipelineExecutor(graph, models, clock).run(
            kw.pop("request", None) or {"text": "hi", "n": 1}, clock() + kw.pop("budget_s", 5.0),
            events.append, **kw)
    return info.value, models, events


def overlaps(a: mesh_pb2.NodeTrace, b: mesh_pb2.NodeTrace) -> bool:
    return a.start_ms < b.end_ms and b.start_ms < a.end_ms


SUPPORT = {
    "nodes": {
        "intent": {"model": "intent-classifier", "input": "request.text"},
        "embed": {"model": "embedder", "input": "request.text"},
        "retrieve": {"model": "kb-index", "input": "embed.output"},
        "orders": {"model": "sql-executor", "when": "intent.label == 'order_status'", "optional": True},
        "answer": {"model": "dialogue-llm", "after": ["retrieve", "orders"], "stream": True},
    },
}


def support(**over: Behaviour) -> dict[str, Behaviour]:
    return {"intent-classifier": ok(10, label="order_status"), "embedder": ok(20, output=[0.1, 0.2]),
            "kb-index": ok(10, output="passage"), "sql-executor": ok(10, rows="shipped"),
            "dialogue-llm": ok(10, text="It shipped."), **over}


# -- scheduling ---------------------------------------------------------------------

async def test_independent_nodes_overlap_and_join_waits_for_both():
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb"},
                      "c": {"model": "mc", "after": ["a", "b"]}}}
    r = await run(spec, {"ma": ok(40), "mb": ok(40), "mc": ok(10)})
    a, b, c = r.span("a"), r.span("b"), r.span("c")
    assert overlaps(a, b)
    assert c.start_ms >= max(a.end_ms, b.end_ms)
    assert [n.status for n in r.outcome.trace.nodes] == ["ok", "ok", "ok"]
    # Times are relative to the pipeline start on the injected clock.
    assert 0 <= a.start_ms < 1000 and r.outcome.trace.total_ms >= c.end_ms


async def test_implicit_dependency_orders_nodes_and_feeds_env():
    r = await run(SUPPORT, support())
    embed, retrieve, intent = r.span("embed"), r.span("retrieve"), r.span("intent")
    assert retrieve.start_ms >= embed.end_ms                  # input: embed.output, no `after`
    assert overlaps(intent, embed)
    call = r.models.called("kb-index")[0]
    assert call.env["embed"] == {"output": [0.1, 0.2]}
    assert call.env["request"] == {"text": "where is my order 42?"}
    assert "intent" not in call.env                           # only what it descends from
    answer_env = r.models.called("dialogue-llm")[0].env
    assert set(answer_env) == {"request", "intent", "embed", "retrieve", "orders"}
    assert r.outcome.answer_outputs == {"text": "It shipped."} and r.outcome.answer == "It shipped."
    assert r.outcome.output == "answer" and not r.outcome.degraded


async def test_node_result_times_fill_the_trace():
    r = await run({"nodes": {"a": {"model": "ma"}}}, {"ma": ok(20)})
    a = r.span("a")
    assert a.queue_ms == 1.0 and a.compute_ms == 10.0 and a.variant == "a" and a.model_used == "ma"
    assert a.network_ms == pytest.approx(max(0.0, a.end_ms - a.start_ms - 11.0))


async def test_when_false_skips_without_calling_and_dependents_see_none():
    r = await run(SUPPORT, support(**{"intent-classifier": ok(10, label="chitchat")}))
    assert r.span("orders").status == "skipped"
    assert r.models.called("sql-executor") == []
    assert r.models.called("dialogue-llm")[0].env["orders"] is None
    assert r.outcome.outputs["orders"] is None and not r.outcome.degraded
    assert r.span("answer").status == "ok"


async def test_when_true_runs_after_its_reference():
    r = await run(SUPPORT, support())
    assert r.span("orders").status == "ok"
    assert r.span("orders").start_ms >= r.span("intent").end_ms
    assert r.outcome.outputs["orders"] == {"rows": "shipped"}


async def test_when_evaluation_error_fails_required_node_naming_it():
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb", "after": ["a"], "when": "request.n > 'x'"}}}
    err, models, _ = await run_fails(spec, {"ma": ok(5), "mb": ok(5)}, InvalidInput, name="pipe")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.node == "b" and err.pipeline == "pipe"
    assert err.field == "when" and "'b'" in err.message and "'pipe'" in err.message
    assert "request.n > 'x'" in err.message
    assert models.called("mb") == []


async def test_when_evaluation_error_degrades_optional_node():
    spec = {"nodes": {"a": {"model": "ma", "when": "request.n > 'x'", "optional": True},
                      "b": {"model": "mb", "after": ["a"]}}}
    r = await run(spec, {"ma": ok(5), "mb": ok(5)}, request={"n": 1})
    assert r.span("a").status == "degraded" and "INVALID_ARGUMENT" in r.span("a").error
    assert r.outcome.degraded and r.span("b").status == "ok"


# -- failures -----------------------------------------------------------------------

async def test_optional_failure_degrades_and_the_answer_still_comes():
    r = await run(SUPPORT, support(**{"sql-executor": fail(Unavailable("db down", component="sql"))}))
    orders = r.span("orders")
    assert orders.status == "degraded" and "db down" in orders.error
    assert r.outcome.outputs["orders"] is None and r.outcome.degraded
    assert r.models.called("dialogue-llm")[0].env["orders"] is None
    assert r.outcome.answer == "It shipped."


async def test_optional_breaker_open_and_timeout_degrade():
    spec = {"nodes": {"x": {"model": "mx", "optional": True},
                      "y": {"model": "my", "optional": True, "timeout_ms": 20},
                      "z": {"model": "mz", "after": ["x", "y"]}}}
    r = await run(spec, {"mx": fail(breaker_open("mx"), ms=0), "my": hang(), "mz": ok(5)})
    assert r.span("x").status == "degraded" and "UNAVAILABLE" in r.span("x").error
    assert r.span("y").status == "degraded" and "DEADLINE_EXCEEDED" in r.span("y").error
    assert r.models.cancelled == ["y"]
    assert r.span("z").status == "ok" and r.outcome.degraded


async def test_required_failure_keeps_code_and_names_node_and_pipeline():
    err_in = ResourceExhausted("queue of kb-index is full", component="kb-index:a", retry_after_ms=50)
    err, models, events = await run_fails(SUPPORT, support(**{"kb-index": fail(err_in)}),
                                          ResourceExhausted, name="support-agent")
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.node == "retrieve" and err.pipeline == "support-agent"
    assert "'retrieve'" in str(err) and "'support-agent'" in str(err) and "queue of kb-index" in str(err)
    detail = err.detail()
    assert (detail.node, detail.pipeline, detail.component, detail.retry_after_ms) == \
        ("retrieve", "support-agent", "kb-index:a", 50)
    assert models.called("dialogue-llm") == []
    failed = [e.node_finished for e in events if e.HasField("node_finished")
              and e.node_finished.status == "failed"]
    assert [f.node for f in failed] == ["retrieve"]


async def test_required_failure_cancels_running_nodes_before_returning():
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb"}, "c": {"model": "mc", "after": ["b"]}}}
    err, models, _ = await run_fails(spec, {"ma": fail(Unavailable("gone"), ms=10), "mb": hang(),
                                            "mc": ok()}, Unavailable)
    assert err.node == "a"
    assert models.cancelled == ["b"]                # already cancelled when run() raised
    assert models.called("mc") == []


async def test_trace_after_a_failure_shows_finished_failed_and_cancelled_nodes():
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb", "after": ["a"]}, "c": {"model": "mc"},
                      "d": {"model": "md", "after": ["b", "c"]}}}
    clock = Clock()
    models = FakeModels(clock, {"ma": ok(5), "mb": fail(Unavailable("down"), ms=5), "mc": hang(),
                                "md": ok()})
    executor = PipelineExecutor(PipelineGraph.build("p", PipelineConfig.model_validate(spec)), models, clock)
    with pytest.raises(Unavailable):
        await executor.run({}, clock() + 5)
    trace = executor.trace()
    assert {n.node: n.status for n in trace.nodes} == {"a": "ok", "b": "failed", "c": "cancelled"}
    assert list(trace.critical_path) == ["a", "b"]
    assert trace.total_ms >= max(n.end_ms for n in trace.nodes)


async def test_unexpected_exception_becomes_internal_naming_the_node():
    spec = {"nodes": {"a": {"model": "ma"}}}
    err, _, _ = await run_fails(spec, {"ma": fail(RuntimeError("boom"))}, Internal)
    assert err.node == "a" and "boom" in err.message and err.code == grpc.StatusCode.INTERNAL


# -- fallback -------------------------------------------------------------------------

FALLBACK = {"nodes": {"q": {"model": "mq"},
                      "answer": {"model": "big", "input": "q.output", "fallback": "small"}}}


async def test_fallback_on_breaker_open_uses_same_inputs():
    r = await run(FALLBACK, {"mq": ok(5), "big": fail(breaker_open("big")), "small": ok(5, text="ok")})
    span = r.span("answer")
    assert span.status == "fallback" and span.model == "big" and span.model_used == "small"
    assert "breaker" in span.error
    assert r.models.called("small")[0].env == r.models.called("big")[0].env
    assert r.outcome.answer == "ok" and not r.outcome.degraded


async def test_fallback_on_the_nodes_own_timeout():
    spec = {"nodes": {"a": {"model": "big", "timeout_ms": 20, "fallback": "small"}}}
    r = await run(spec, {"big": hang(), "small": ok(5)})
    assert r.span("a").status == "fallback" and r.models.cancelled == ["a"]


async def test_no_fallback_for_invalid_input():
    err, models, _ = await run_fails(FALLBACK, {"mq": ok(5), "big": fail(InvalidInput("text", "too long")),
                                                "small": ok()}, InvalidInput)
    assert err.node == "answer" and models.called("small") == []


async def test_no_fallback_when_the_pipeline_deadline_ran_out():
    spec = {"nodes": {"a": {"model": "big", "fallback": "small"}}}
    err, models, _ = await run_fails(spec, {"big": hang(), "small": ok()}, DeadlineExceeded,
                                     budget_s=0.05)
    assert err.node == "a" and err.reason == "deadline" and models.called("small") == []


async def test_failing_fallback_fails_the_node_with_both_reasons():
    err, models, _ = await run_fails(FALLBACK, {"mq": ok(5), "big": fail(Unavailable("big down")),
                                                "small": fail(Unavailable("small down"))}, Unavailable)
    assert err.node == "answer" and "small down" in err.message and "big down" in err.message


# -- deadlines ------------------------------------------------------------------------

async def test_deadline_exhausted_mid_pipeline_names_the_running_node():
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb", "after": ["a"]}}}
    err, models, _ = await run_fails(spec, {"ma": ok(10), "mb": hang()}, DeadlineExceeded,
                                     budget_s=0.2, name="chain")
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.node == "b" and err.pipeline == "chain"
    assert "'b'" in err.message and "'chain'" in err.message and "deadline" in err.message
    assert err.detail().node == "b" and err.detail().pipeline == "chain"
    assert models.cancelled == ["b"]
    # The call was handed the pipeline deadline itself.
    assert models.called("mb")[0].deadline == pytest.approx(models.called("ma")[0].deadline)


async def test_deadline_exhausted_before_a_node_does_not_call_it():
    clock = Clock()

    async def stall(call: Call) -> NodeResult:
        clock.skip(10.0)                    # the budget is gone when `a` returns
        return NodeResult(outputs={"output": 1})

    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb", "after": ["a"]}}}
    err, models, _ = await run_fails(spec, {"ma": stall, "mb": ok()}, DeadlineExceeded, clock=clock)
    assert err.node == "b" and models.called("mb") == []


async def test_deadline_exhausted_before_an_optional_node_degrades():
    clock = Clock()

    async def stall(call: Call) -> NodeResult:
        clock.skip(10.0)
        return NodeResult(outputs={"output": 1})

    spec = {"output": "a", "nodes": {"a": {"model": "ma"},
                                     "b": {"model": "mb", "after": ["a"], "optional": True}}}
    r = await run(spec, {"ma": stall, "mb": ok()}, clock=clock)
    assert r.span("b").status == "degraded" and r.outcome.degraded and r.models.called("mb") == []


async def test_node_timeout_ms_bounds_the_call_within_the_pipeline_budget():
    spec = {"nodes": {"a": {"model": "ma", "timeout_ms": 30}}}
    err, models, _ = await run_fails(spec, {"ma": hang()}, DeadlineExceeded, budget_s=30.0)
    assert err.node == "a" and err.reason == "node_timeout" and "timeout_ms=30" in err.message
    call = models.called("ma")[0]
    assert call.deadline - call.at == pytest.approx(0.03, abs=0.01)


# -- trace ----------------------------------------------------------------------------

DIAMOND = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb", "after": ["a"]},
                     "c": {"model": "mc", "after": ["a"]}, "d": {"model": "md", "after": ["b", "c"]}}}


async def test_critical_path_on_a_diamond_follows_the_slow_branch():
    r = await run(DIAMOND, {"ma": ok(10), "mb": ok(50), "mc": ok(10), "md": ok(10)})
    trace = r.outcome.trace
    assert list(trace.critical_path) == ["a", "b", "d"]
    assert {n.node: n.critical for n in trace.nodes} == {"a": True, "b": True, "c": False, "d": True}
    shares = share_of_critical_path(trace)
    assert set(shares) == {"a", "b", "d"}
    assert shares["b"] > shares["a"] and 0 < sum(shares.values()) <= 1.0 + 1e-9


async def test_critical_path_flips_with_the_slow_branch():
    r = await run(DIAMOND, {"ma": ok(10), "mb": ok(10), "mc": ok(50), "md": ok(10)})
    assert list(r.outcome.trace.critical_path) == ["a", "c", "d"]


def span(node: str, start: float, end: float) -> mesh_pb2.NodeTrace:
    return node_trace(node, "m", "ok", start, end)


def test_critical_path_ties_prefer_the_longer_dependency():
    spans = {"a": span("a", 0, 10), "b": span("b", 5, 30), "c": span("c", 15, 30), "d": span("d", 30, 40)}
    deps = {"b": ["a"], "c": ["a"], "d": ["c", "b"]}
    assert critical_path(spans, deps, "d") == ["a", "b", "d"]


def test_network_time_is_the_unaccounted_rest_floored_at_zero():
    assert node_trace("x", "m", "ok", 0, 10, queue_ms=2, compute_ms=5).network_ms == 3
    assert node_trace("x", "m", "ok", 0, 10, queue_ms=8, compute_ms=5).network_ms == 0


def test_build_trace_marks_critical_nodes_and_shares():
    nodes = [span("a", 0, 10), span("b", 10, 40), span("c", 10, 15), span("d", 40, 50)]
    trace = build_trace("p", nodes, {"b": ["a"], "c": ["a"], "d": ["b", "c"]}, "d", 52.0)
    assert list(trace.critical_path) == ["a", "b", "d"] and trace.total_ms == 52.0
    assert [n.critical for n in trace.nodes] == [True, True, False, True]
    assert not nodes[0].critical                   # the inputs are left alone
    assert share_of_critical_path(trace) == pytest.approx({"a": 0.2, "b": 0.6, "d": 0.2})


# -- streaming and events -------------------------------------------------------------

def streaming(tokens: list[str]) -> Behaviour:
    async def run(call: Call) -> NodeResult:
        if call.on_token is not None:
            for t in tokens:
                await asyncio.sleep(0.003)
                await call.on_token(t)
        return NodeResult(outputs={"text": "".join(tokens)})
    return run


async def test_streamed_tokens_are_forwarded_in_order_inside_the_node_events():
    r = await run(SUPPORT, support(**{"dialogue-llm": streaming(["It ", "has ", "shipped", "."])}),
                  stream=True)
    kinds = [e.WhichOneof("event") for e in r.events]
    tokens = [e.token for e in r.events if e.HasField("token")]
    assert tokens == ["It ", "has ", "shipped", "."]
    started = next(i for i, e in enumerate(r.events)
                   if e.HasField("node_started") and e.node_started.node == "answer")
    finished = next(i for i, e in enumerate(r.events)
                    if e.HasField("node_finished") and e.node_finished.node == "answer")
    assert started < kinds.index("token") and max(i for i, k in enumerate(kinds) if k == "token") < finished
    assert r.outcome.answer == "It has shipped."
    # Only the output node streams.
    assert all(c.on_token is None for c in r.models.calls if c.model != "dialogue-llm")


async def test_no_tokens_unless_the_caller_asks_for_streaming():
    r = await run(SUPPORT, support(**{"dialogue-llm": streaming(["a", "b"])}), stream=False)
    assert r.models.called("dialogue-llm")[0].on_token is None
    assert not any(e.HasField("token") for e in r.events)


async def test_no_fallback_after_tokens_were_streamed():
    async def half(call: Call) -> NodeResult:
        await call.on_token("partial ")
        raise Unavailable("replica died mid-stream")

    spec = {"nodes": {"a": {"model": "big", "stream": True, "fallback": "small"}}}
    err, models, events = await run_fails(spec, {"big": half, "small": ok()}, Unavailable, stream=True)
    assert models.called("small") == [] and [e.token for e in events if e.HasField("token")] == ["partial "]


async def test_events_for_a_chain_and_a_skipped_node_with_a_sync_sink():
    spec = {"nodes": {"a": {"model": "ma", "when": "request.go"}, "b": {"model": "mb"},
                      "c": {"model": "mc", "after": ["b"]}}}
    r = await run(spec, {"ma": ok(), "mb": ok(), "mc": ok()}, request={"go": False}, sink="sync")
    seen = [(e.WhichOneof("event"), e.node_started.node or e.node_finished.node) for e in r.events]
    assert seen == [("node_finished", "a"), ("node_started", "b"), ("node_finished", "b"),
                    ("node_started", "c"), ("node_finished", "c")]
    started = r.events[1].node_started
    assert started.model == "mb" and started.at_ms == pytest.approx(r.span("b").start_ms)
    assert r.events[-1].node_finished.status == "ok"


async def test_event_sink_errors_reach_the_caller_unchanged():
    class Gone(Exception):
        pass

    def sink(event: mesh_pb2.RunEvent) -> None:
        if event.HasField("token"):
            raise Gone()

    clock = Clock()
    spec = {"nodes": {"a": {"model": "llm", "stream": True, "fallback": "small"}}}
    models = FakeModels(clock, {"llm": streaming(["x", "y"]), "small": ok()})
    executor = PipelineExecutor(PipelineGraph.build("p", PipelineConfig.model_validate(spec)), models, clock)
    with pytest.raises(Gone):
        await executor.run({}, clock() + 5, sink, stream=True)
    assert models.called("small") == []


# -- the run as a whole -----------------------------------------------------------------

async def test_cancelling_the_run_cancels_its_nodes():
    clock = Clock()
    spec = {"nodes": {"a": {"model": "ma"}, "b": {"model": "mb"}}}
    models = FakeModels(clock, {"ma": hang(), "mb": hang()})
    executor = PipelineExecutor(PipelineGraph.build("p", PipelineConfig.model_validate(spec)), models, clock)
    task = asyncio.create_task(executor.run({}, clock() + 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(models.cancelled) == ["a", "b"]
    assert {n.status for n in executor.trace().nodes} == {"cancelled"}


async def test_concurrent_runs_on_one_executor_do_not_mix():
    clock = Clock()

    async def echo(call: Call) -> NodeResult:
        await asyncio.sleep(0.01)
        return NodeResult(outputs={"text": call.env["request"]["text"]})

    spec = {"nodes": {"a": {"model": "m"}, "b": {"model": "m", "input": "a.text"}}}
    executor = PipelineExecutor(PipelineGraph.build("p", PipelineConfig.model_validate(spec)),
                                FakeModels(clock, {"m": echo}), clock)
    one, two = await asyncio.gather(executor.run({"text": "one"}, clock() + 5),
                                    executor.run({"text": "two"}, clock() + 5))
    assert (one.answer, two.answer) == ("one", "two")
    assert len(one.trace.nodes) == len(two.trace.nodes) == 2
    assert list(one.trace.critical_path) == ["a", "b"] == list(two.trace.critical_path)


async def test_trace_method_matches_the_outcome_after_success():
    clock = Clock()
    executor = PipelineExecutor(PipelineGraph.build("p", PipelineConfig.model_validate(DIAMOND)),
                                FakeModels(clock, {m: ok(5) for m in ("ma", "mb", "mc", "md")}), clock)
    outcome = await executor.run({}, clock() + 5)
    assert executor.trace() == outcome.trace
