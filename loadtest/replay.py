"""Trace replay: open-loop arrivals from a scenario file against a running mesh.

    python -m loadtest.replay --scenario loadtest/scenarios/spike10x.yaml \\
        --target 127.0.0.1:8000 --autoscaler 127.0.0.1:8500 [--compress 2] [--out DIR]

Every arrival of the scenario (``loadtest.scenario.arrivals``) is sent at its time
whether or not earlier requests have been answered (open loop), as Pipelines.Run or
ModelInfer with ``cmesh-latency-class``, ``cmesh-pipeline-id`` and an API key. Past
``--max-in-flight`` a request is recorded as a client-side drop, never skipped.
Latency is measured from each request's *scheduled* time, so a slow client cannot
hide queueing (no coordinated omission); the send lag is reported beside it. With
``--autoscaler``, replica counts per model and state are sampled every second.

After the scenario, in-flight requests get ``--drain-timeout`` seconds; those still
unanswered are recorded as errors with reason "timeout". Every request ends with an
outcome (ok, error with status and reason, or dropped): ``lost`` counts those that
did not, and must be 0. Writes ``<out>/summary.json``, ``<out>/requests.jsonl`` (one
line per request) and ``<out>/replay.png``; prints key numbers and, last, one JSON
object: the summary's totals.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cmesh.client import DEFAULT_OPTIONS, build_request
from cmesh.errors import component_error_of
from loadtest.common import emit
from loadtest.scenario import Arrival, Scenario, ScenarioError, arrivals, expected_count, load_scenario
from protos import inference_pb2_grpc as pb_grpc
from protos import mesh_pb2, mesh_pb2_grpc

DEFAULT_API_KEY = "cmesh-keys-acme-demo"
DROP_REASON = "client in-flight limit"
TIMEOUT_REASON = "timeout"


# --- records (pure) ------------------------------------------------------------------------

@dataclass
class Record:
    """One request's fate. Times are seconds since the replay started (wall clock)."""

    index: int
    class_name: str
    target_kind: str
    target: str
    latency_class: str
    scenario_t_s: float
    scheduled_s: float
    start_s: float | None = None
    end_s: float | None = None
    outcome: str | None = None        # "ok", "error", "dropped"; None: no outcome (lost)
    code: str = ""                    # status code name ("OK", "NOT_FOUND", ...)
    reason: str = ""                  # ComponentError reason, else the status message
    message: str = ""

    @classmethod
    def of(cls, index: int, a: Arrival) -> "Record":
        return cls(index=index, class_name=a.class_name, target_kind=a.target_kind, target=a.target,
                   latency_class=a.latency_class, scenario_t_s=a.scenario_t_s, scheduled_s=a.t_s)

    def finish(self, now: float, outcome: str, code: str, reason: str = "", message: str = "") -> None:
        if self.outcome is None:      # the first outcome stands
            self.end_s, self.outcome, self.code = now, outcome, code
            self.reason, self.message = reason, message[:300]

    @property
    def key(self) -> str:
        return f"{self.target_kind}:{self.target}"

    @property
    def latency_ms(self) -> float | None:
        if self.outcome in ("ok", "error") and self.end_s is not None:
            return (self.end_s - self.scheduled_s) * 1000.0
        return None


@dataclass
class ReplicaSample:
    t_s: float                                   # seconds since the replay started
    states: dict[str, dict[str, int]]            # model -> state -> replicas
    reported_s: dict[str, float]                 # model -> the autoscaler's replica_seconds


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def group_stats(records: list[Record], wall_s: float) -> dict:
    ok = [r.latency_ms for r in records if r.outcome == "ok"]
    errors = [r for r in records if r.outcome == "error"]
    reasons = Counter(f"{r.code}: {r.reason}" for r in records if r.outcome in ("error", "dropped"))
    return {
        "count": len(records), "ok": len(ok), "errors": len(errors),
        "drops": sum(r.outcome == "dropped" for r in records),
        "lost": sum(r.outcome is None for r in records),
        "errors_by_code": dict(sorted(Counter(r.code for r in errors).items())),
        "reasons": dict(reasons.most_common(10)),
        "p50_ms": _pct(ok, 50), "p95_ms": _pct(ok, 95), "p99_ms": _pct(ok, 99),
        "mean_ms": round(float(np.mean(ok)), 3) if ok else None,
        "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "offered_rps": round(len(records) / wall_s, 3) if wall_s > 0 else None,
    }


def grouped(records: Iterable[Record], key: Callable[[Record], str], wall_s: float) -> dict[str, dict]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return {k: group_stats(v, wall_s) for k, v in sorted(groups.items())}


def integrate_replicas(samples: list[ReplicaSample], end_s: float) -> dict[str, dict[str, float]]:
    """Replica-seconds per model (ready, and in any state): each sample holds until the next."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"ready": 0.0, "all": 0.0})
    for i, s in enumerate(samples):
        dt = (samples[i + 1].t_s if i + 1 < len(samples) else max(end_s, s.t_s)) - s.t_s
        for model, states in s.states.items():
            out[model]["ready"] += dt * states.get("ready", 0)
            out[model]["all"] += dt * sum(states.values())
    return {m: {k: round(v, 3) for k, v in d.items()} for m, d in sorted(out.items())}


def timeline(records: list[Record], duration_s: float, windows: int | None = None) -> list[dict]:
    """Per window of scenario time (by scheduled time): counts and latency percentiles.
    By default about 30 requests a window (for a meaningful p99), 4 to 60 windows."""
    if windows is None:
        windows = min(60, max(4, len(records) // 30))
    width = duration_s / windows
    buckets: list[list[Record]] = [[] for _ in range(windows)]
    for r in records:
        buckets[min(int(r.scenario_t_s / width), windows - 1)].append(r)
    rows = []
    for i, bucket in enumerate(buckets):
        row = {"t_s": round(i * width, 3), "width_s": round(width, 3), "count": len(bucket),
               "ok": sum(r.outcome == "ok" for r in bucket),
               "errors": sum(r.outcome == "error" for r in bucket),
               "drops": sum(r.outcome == "dropped" for r in bucket),
               "count_by_class": dict(sorted(Counter(r.latency_class for r in bucket).items())), "latency_ms": {}}
        for lc in sorted({r.latency_class for r in bucket}):
            ok = [r.latency_ms for r in bucket if r.outcome == "ok" and r.latency_class == lc]
            row["latency_ms"][lc] = {"p50": _pct(ok, 50), "p95": _pct(ok, 95), "p99": _pct(ok, 99)}
        rows.append(row)
    return rows


def summarize(records: list[Record], samples: list[ReplicaSample], *, scenario: Scenario, compress: float,
              elapsed_s: float, target: str, autoscaler: str | None, sampler_errors: int = 0,
              rate_scale: float = 1.0) -> dict:
    wall_s = scenario.duration_s / compress
    totals = group_stats(records, wall_s)
    lags = [(r.start_s - r.scheduled_s) * 1000.0 for r in records if r.start_s is not None]
    totals = {"scenario": scenario.name, "requests": totals.pop("count"), **totals,
              "timeouts": sum(r.reason == TIMEOUT_REASON for r in records),
              "send_lag_p99_ms": _pct(lags, 99), "send_lag_max_ms": round(max(lags), 3) if lags else None,
              "scenario_wall_s": round(wall_s, 3), "elapsed_s": round(elapsed_s, 3)}
    replica_seconds = integrate_replicas(samples, elapsed_s)
    reported = {}
    if len(samples) >= 2:
        first, last = samples[0].reported_s, samples[-1].reported_s
        reported = {m: round(last[m] - first.get(m, 0.0), 3) for m in sorted(last)}
    return {
        "scenario": {"name": scenario.name, "description": scenario.description, "seed": scenario.seed,
                     "duration_s": scenario.duration_s, "compress": compress, "rate_scale": rate_scale,
                     "expected_requests": round(expected_count(scenario) * rate_scale, 1)},
        "target": target, "autoscaler": autoscaler,
        "latency": "from each request's scheduled time to its answer, OK requests only (ms)",
        "totals": totals,
        "by_target": grouped(records, lambda r: r.key, wall_s),
        "by_latency_class": grouped(records, lambda r: r.latency_class, wall_s),
        "by_target_and_class": grouped(records, lambda r: f"{r.key}|{r.latency_class}", wall_s),
        "by_scenario_class": grouped(records, lambda r: r.class_name, wall_s),
        "drops": {"count": totals["drops"],
                  "by_reason": dict(Counter(r.reason for r in records if r.outcome == "dropped"))},
        "replica_seconds": {m: v["ready"] for m, v in replica_seconds.items()},
        "replicas": {"sampled": autoscaler is not None, "samples": len(samples),
                     "sampler_errors": sampler_errors, "replica_seconds": replica_seconds,
                     "autoscaler_replica_seconds": reported,
                     "max_ready": {m: max(s.states.get(m, {}).get("ready", 0) for s in samples)
                                   for m in replica_seconds},
                     # wall seconds since the start -> ready replicas per model
                     "timeline": [[round(s.t_s, 2), {m: st.get("ready", 0) for m, st in sorted(s.states.items())}]
                                  for s in samples]},
        "timeline": timeline(records, scenario.duration_s),
    }


# --- sending (I/O) -------------------------------------------------------------------------

class Sender:
    """Turns an arrival into a Pipelines.Run or ModelInfer call on one channel."""

    def __init__(self, channel: grpc.aio.Channel, api_key: str, run_id: str) -> None:
        self.pipelines = mesh_pb2_grpc.PipelinesStub(channel)
        self.infer = pb_grpc.GRPCInferenceServiceStub(channel)
        self.api_key = api_key
        self.run_id = run_id

    async def send(self, index: int, a: Arrival, timeout: float) -> None:
        request_id = f"replay-{self.run_id}-{index}"
        metadata = [("cmesh-latency-class", a.latency_class), ("cmesh-pipeline-id", a.pipeline_id),
                    ("cmesh-request-id", request_id)]
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        if a.target_kind == "pipeline":
            await self.pipelines.Run(mesh_pb2.RunRequest(pipeline=a.target, inputs={"text": a.payload_text},
                                                         request_id=request_id),
                                     timeout=timeout, metadata=metadata)
        else:
            text = np.array([a.payload_text.encode()], dtype=object)
            await self.infer.ModelInfer(build_request(a.target, {a.input_name: text}, parameters=a.params,
                                                      request_id=request_id),
                                        timeout=timeout, metadata=metadata)


@dataclass
class ReplayOptions:
    target: str
    autoscaler: str | None = None
    internal_token: str | None = field(default=None, repr=False)   # for the autoscaler's Status
    compress: float | None = None            # None: the scenario's own
    rate_scale: float = 1.0                  # every class's rate times this
    out: Path = Path("results/replay")
    api_key: str = DEFAULT_API_KEY
    max_in_flight: int = 1000
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    sample_interval_s: float = 1.0
    progress_s: float = 5.0
    connect_timeout_s: float = 10.0
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


class Replayer:
    """Open-loop schedule: a timer per arrival, bounded in-flight, drain, no lost requests."""

    def __init__(self, sender: Sender, schedule: list[Arrival], options: ReplayOptions,
                 clock: Callable[[], float]) -> None:
        self.sender = sender
        self.schedule = schedule
        self.options = options
        self.clock = clock
        self.records = [Record.of(i, a) for i, a in enumerate(schedule)]
        self.tasks: set[asyncio.Task] = set()
        self.in_flight = 0
        self.sent = 0
        self.t0 = 0.0

    def now(self) -> float:
        return self.clock() - self.t0

    async def run(self, t0: float) -> None:
        self.t0 = t0
        for index, arrival in enumerate(self.schedule):
            delay = arrival.t_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)          # the loop's timer; nothing here waits on answers
            self.launch(index, arrival)
        await self.drain()

    def launch(self, index: int, arrival: Arrival) -> None:
        record = self.records[index]
        record.start_s = self.now()
        self.sent += 1
        if self.in_flight >= self.options.max_in_flight:
            record.finish(record.start_s, "dropped", "RESOURCE_EXHAUSTED", DROP_REASON,
                          f"{self.in_flight} requests in flight (--max-in-flight {self.options.max_in_flight})")
            return
        self.in_flight += 1
        task = asyncio.create_task(self.call(index, arrival, record))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self.done(t, record))

    def done(self, task: asyncio.Task, record: Record) -> None:
        self.tasks.discard(task)
        self.in_flight -= 1
        if task.cancelled():          # cancelled at the drain, possibly before it ever ran
            record.finish(self.now(), "error", "DEADLINE_EXCEEDED", TIMEOUT_REASON,
                          f"unanswered {self.options.drain_timeout_s:g} s after the scenario ended")

    async def call(self, index: int, arrival: Arrival, record: Record) -> None:
        try:
            await self.sender.send(index, arrival, self.options.request_timeout_s)
            record.finish(self.now(), "ok", "OK")
        except grpc.aio.AioRpcError as exc:
            err = component_error_of(exc)
            reason = err.detail.reason if err.detail is not None and err.detail.reason else err.message
            record.finish(self.now(), "error", err.code.name, reason, err.message)
        except Exception as exc:  # noqa: BLE001 - a client-side failure is an outcome too
            record.finish(self.now(), "error", "CLIENT_ERROR", type(exc).__name__, str(exc))

    async def drain(self) -> None:
        if not self.tasks:
            return
        pending = set(self.tasks)
        self.options.log(f"scenario done; draining {len(pending)} in-flight request(s) "
                         f"(up to {self.options.drain_timeout_s:g} s)")
        _, still = await asyncio.wait(pending, timeout=self.options.drain_timeout_s)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)

    def progress_line(self) -> str:
        c = Counter(r.outcome for r in self.records)
        return (f"t={self.now():7.1f}s  sent {self.sent}/{len(self.records)}  in flight {self.in_flight}  "
                f"ok {c['ok']}  errors {c['error']}  drops {c['dropped']}")


async def every(interval_s: float, stop: asyncio.Event, clock: Callable[[], float], action) -> None:
    """Run ``action`` at t0, t0 + interval, ... until ``stop`` is set (timer-driven)."""
    t0, k = clock(), 0
    while not stop.is_set():
        await action()
        k += 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, t0 + k * interval_s - clock()))
        except TimeoutError:
            pass


class ReplicaSampler:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, now: Callable[[], float]) -> None:
        self.stub = mesh_pb2_grpc.AutoscalerStub(channel)
        self.timeout_s = timeout_s
        self.now = now
        self.samples: list[ReplicaSample] = []
        self.errors = 0
        self.last_error = ""

    async def sample(self) -> None:
        try:
            status = await self.stub.Status(mesh_pb2.StatusRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.errors += 1
            self.last_error = f"{exc.code().name}: {exc.details()}"
            return
        states = {m.model: dict(Counter(r.state for r in m.replicas)) for m in status.models}
        self.samples.append(ReplicaSample(self.now(), states, {m.model: m.replica_seconds for m in status.models}))


# --- plot ----------------------------------------------------------------------------------

def plot(summary: dict, samples: list[ReplicaSample], compress: float, path: Path) -> None:
    """Latency percentiles per latency class, request outcomes, and replicas per model over
    scenario time, stacked on one x axis."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = summary["timeline"]
    fig = Figure(figsize=(11, 9), layout="constrained")
    ax_lat, ax_req, ax_rep = fig.subplots(3, 1, sharex=True)
    mid = [r["t_s"] + r["width_s"] / 2 for r in rows]
    per_s = [compress / r["width_s"] for r in rows]        # counts per window -> per wall second
    classes = sorted({lc for r in rows for lc in r["count_by_class"]})
    colors = dict(zip(classes, ("tab:blue", "tab:orange", "tab:green")))
    for lc in classes:
        for q, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            ys = [r["latency_ms"].get(lc, {}).get(q) for r in rows]
            ax_lat.plot(mid, [np.nan if y is None else y for y in ys], style, color=colors[lc], marker=".",
                        markersize=3, label=f"{lc} {q}")
        ax_req.plot(mid, [r["count_by_class"].get(lc, 0) * f for r, f in zip(rows, per_s)], ":",
                    color=colors[lc], label=f"sent {lc}")
    if summary["totals"]["ok"]:
        ax_lat.set_yscale("log")
        ax_lat.legend(fontsize=8, ncol=len(classes))
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title(f"replay {summary['scenario']['name']} (compress {compress:g}) against {summary['target']}")
    for key, label, color in (("count", "sent", "tab:gray"), ("ok", "ok", "tab:green"),
                              ("errors", "errors", "tab:red"), ("drops", "drops", "tab:purple")):
        ax_req.plot(mid, [r[key] * f for r, f in zip(rows, per_s)], color=color, label=label)
    ax_req.set_ylabel("requests / wall s")
    ax_req.legend(fontsize=8, ncol=6)
    if samples:
        ts = [s.t_s * compress for s in samples]
        models = sorted({m for s in samples for m in s.states})
        for i, model in enumerate(models):
            color, lift = f"C{i % 10}", 0.04 * i         # lifted a little, so equal counts stay visible
            ready = [s.states.get(model, {}).get("ready", 0) + lift for s in samples]
            total = [sum(s.states.get(model, {}).values()) + lift for s in samples]
            ax_rep.step(ts, ready, where="post", color=color, label=f"{model} ready")
            ax_rep.step(ts, total, where="post", color=color, linestyle="--", alpha=0.5)
        ax_rep.legend(fontsize=8, ncol=3, title="dashed: any state (lines offset slightly)", title_fontsize=8)
    else:
        ax_rep.text(0.5, 0.5, "replicas not sampled (no --autoscaler)", ha="center", va="center",
                    transform=ax_rep.transAxes)
    ax_rep.set_ylim(bottom=0)
    ax_rep.set_ylabel("replicas")
    ax_rep.set_xlabel("scenario time (s)")
    fig.savefig(path, dpi=100)


# --- entry points --------------------------------------------------------------------------

async def run(options: ReplayOptions, scenario: Scenario) -> dict:
    """Replay the scenario against options.target; write the outputs; return the summary."""
    compress = options.compress or scenario.compress
    schedule = arrivals(scenario, compress, options.rate_scale)
    log = options.log
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(options.target, options=DEFAULT_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), options.connect_timeout_s)
        except TimeoutError:
            raise ConnectionError(f"cannot reach the router at {options.target} within "
                                  f"{options.connect_timeout_s:g} s; is the mesh running (make up)?") from None
        replayer = Replayer(Sender(channel, options.api_key, uuid.uuid4().hex[:8]), schedule, options, loop.time)
        from cmesh.internal_auth import MeshCredentials, open_internal_channel

        scaler_channel = open_internal_channel(options.autoscaler, MeshCredentials(token=options.internal_token)) \
            if options.autoscaler else None
        sampler = ReplicaSampler(scaler_channel, max(0.5, options.sample_interval_s), replayer.now) \
            if scaler_channel is not None else None
        log(f"replaying {scenario.name}: {len(schedule)} requests over {scenario.duration_s:g} scenario s "
            f"= {scenario.duration_s / compress:g} wall s (compress {compress:g}) against {options.target}")
        stop = asyncio.Event()
        t0 = loop.time() + 0.05
        replayer.t0 = t0

        async def progress() -> None:
            if replayer.now() > 0:
                log(replayer.progress_line())

        side = [asyncio.create_task(every(options.progress_s, stop, loop.time, progress))]
        if sampler is not None:
            side.append(asyncio.create_task(every(options.sample_interval_s, stop, loop.time, sampler.sample)))
        try:
            await replayer.run(t0)
        finally:
            stop.set()
            await asyncio.gather(*side, return_exceptions=True)
            if scaler_channel is not None:
                await scaler_channel.close()
        elapsed = replayer.now()
    samples = sampler.samples if sampler else []
    if sampler is not None and sampler.errors:
        log(f"warning: {sampler.errors} autoscaler Status call(s) failed (last: {sampler.last_error})")
    summary = summarize(replayer.records, samples, scenario=scenario, compress=compress, elapsed_s=elapsed,
                        target=options.target, autoscaler=options.autoscaler,
                        sampler_errors=sampler.errors if sampler else 0, rate_scale=options.rate_scale)
    write_outputs(options.out, summary, replayer.records, samples, compress)
    return summary


def write_outputs(out: Path, summary: dict, records: list[Record], samples: list[ReplicaSample],
                  compress: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "requests.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps({**asdict(r), "latency_ms": r.latency_ms}) + "\n")
    plot(summary, samples, compress, out / "replay.png")


def report(summary: dict, out: Path) -> list[str]:
    t = summary["totals"]
    lines = [f"{t['scenario']}: {t['requests']} requests, ok {t['ok']}, errors {t['errors']} "
             f"{t['errors_by_code'] or ''}, drops {t['drops']}, lost {t['lost']}; "
             f"throughput {t['throughput_rps']} req/s; p50/p95/p99 {t['p50_ms']}/{t['p95_ms']}/{t['p99_ms']} ms"]
    for key, g in summary["by_target_and_class"].items():
        lines.append(f"  {key:<44} n={g['count']:<5} ok={g['ok']:<5} err={g['errors']:<4} drop={g['drops']:<4} "
                     f"p50/p95/p99 {g['p50_ms']}/{g['p95_ms']}/{g['p99_ms']} ms")
    if summary["replica_seconds"]:
        lines.append("  ready replica-seconds: " + ", ".join(f"{m} {v:.1f}"
                                                               for m, v in summary["replica_seconds"].items()))
    lines.append(f"wrote {out / 'summary.json'}, {out / 'requests.jsonl'}, {out / 'replay.png'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.replay", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios: loadtest/scenarios/{steady,diurnal,spike10x,cv2x}.yaml")
    p.add_argument("--scenario", required=True, metavar="FILE", help="scenario YAML file")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="HOST:PORT of the router")
    p.add_argument("--autoscaler", default=None, metavar="HOST:PORT",
                   help="HOST:PORT of the autoscaler: sample replicas every second")
    p.add_argument("--internal-token-env", default="CMESH_INTERNAL_TOKEN", metavar="NAME",
                   help="env var with the mesh-internal token the autoscaler wants "
                        "(security.internal_token_env; default CMESH_INTERNAL_TOKEN)")
    p.add_argument("--compress", type=float, default=None, metavar="X",
                   help="time compression (default: the scenario's `compress`, else 1)")
    p.add_argument("--rate-scale", type=float, default=1.0, metavar="F",
                   help="multiply every class's rate by F (with --compress X, F = 1/X keeps the original "
                        "requests per second)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: results/replay-<scenario>)")
    p.add_argument("--api-key", default=None, metavar="K",
                   help=f"tenant API key (default: $CMESH_API_KEY, else {DEFAULT_API_KEY})")
    p.add_argument("--max-in-flight", type=int, default=1000, metavar="N",
                   help="client-side cap; arrivals beyond it are recorded as drops")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="gRPC deadline of each request (s)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="after the scenario, wait this long for in-flight requests (s)")
    args = p.parse_args(argv)
    if args.compress is not None and args.compress <= 0:
        p.error("--compress must be > 0")
    if args.rate_scale <= 0:
        p.error("--rate-scale must be > 0")
    if args.max_in_flight < 1:
        p.error("--max-in-flight must be >= 1")
    return args


def options_from(args: argparse.Namespace, scenario: Scenario) -> ReplayOptions:
    return ReplayOptions(
        target=args.target, autoscaler=args.autoscaler, compress=args.compress, rate_scale=args.rate_scale,
        internal_token=os.environ.get(args.internal_token_env) or None,
        out=Path(args.out or f"results/replay-{scenario.name}"),
        api_key=args.api_key or os.environ.get("CMESH_API_KEY") or DEFAULT_API_KEY,
        max_in_flight=args.max_in_flight, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout)


async def main_async(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = options_from(args, scenario)
    try:
        summary = await run(options, scenario)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report(summary, options.out):
        print(line)
    emit(summary["totals"])
    return 0 if summary["totals"]["lost"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    import uvloop

    try:
        return uvloop.run(main_async(argv))
    except KeyboardInterrupt:
        print("interrupted: no summary written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
