"""``cmesh apply`` (with ``--dry-run`` and ``--rollback``), ``cmesh config history``
and ``cmesh rollout status``: the live configuration through a router's Admin
service (admin key from ``--admin-key`` or ``$CMESH_ADMIN_KEY``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cmesh.cli.defaults import DEFAULT_ROUTER
from cmesh.cli.mesh_calls import admin_metadata


def _admin_call(args: argparse.Namespace, method: str, request):
    """The response, or None after printing the refusal (every error, by field)."""
    import grpc

    from protos import mesh_pb2_grpc

    with grpc.insecure_channel(args.router) as channel:
        try:
            return getattr(mesh_pb2_grpc.AdminStub(channel), method)(
                request, metadata=admin_metadata(args.admin_key), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _cmd_apply(args: argparse.Namespace) -> int:
    from protos import mesh_pb2

    if args.rollback == bool(args.file):
        print("error: give a config file, or --rollback without one", file=sys.stderr)
        return 2
    text = Path(args.file).read_text() if args.file else ""
    resp = _admin_call(args, "ApplyConfig", mesh_pb2.ApplyConfigRequest(yaml=text, dry_run=args.dry_run,
                                                                        rollback=args.rollback))
    if resp is None:
        return 1
    from cmesh.config_diff import Change, render

    for line in render([Change(c.kind, c.path, c.before, c.after) for c in resp.changes]):
        print(line)
    if not resp.changes:
        print("no changes")
    rec = resp.record
    if args.dry_run:
        print(f"dry run: nothing applied (in force: {rec.id or '-'})")
    elif resp.applied:
        follows = "follows it" if resp.followed else "does not follow it yet"
        print(f"applied {rec.id} at {_when(rec.applied_at)} by {rec.applied_by} ({rec.source}); "
              f"{resp.routers} router(s) watching; this router {follows}")
    else:
        print(f"nothing applied: {rec.id} is in force")
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from protos import mesh_pb2

    resp = _admin_call(args, "ConfigHistory", mesh_pb2.ConfigHistoryRequest(limit=args.limit))
    if resp is None:
        return 1
    print(f"{'':2}{'id':16} {'applied at':19}  {'source':9} {'by':18} note")
    for r in resp.records:
        mark = "* " if r.id == resp.current_id else "  "
        print(f"{mark}{r.id:16} {_when(r.applied_at):19}  {r.source:9} {r.applied_by[:18]:18} {r.note[:100]}")
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from protos import mesh_pb2

    resp = _admin_call(args, "RolloutStatus", mesh_pb2.RolloutStatusRequest(model=args.model or ""))
    if resp is None:
        return 1
    if not resp.rollouts:
        print("no rollouts")
    for r in resp.rollouts:
        steps = ", ".join(f"{s:g}" for s in r.steps)
        print(f"{r.model}: canary {r.canary} {r.state} at step {r.step} of [{steps}] = {r.weight:g} % "
              f"for {r.step_age_s:.0f} s (config {r.config_id or '-'})")
        for fig in (r.canary_figures, r.baseline_figures):
            p95 = f"{fig.p95_ms:.1f} ms" if fig.p95_ms else "n/a"
            print(f"  {fig.variant:9} answered {fig.answered:6}  failed {fig.failed:5}  "
                  f"error rate {fig.error_rate:.3f}  p95 {p95}")
        print(f"  {r.reason}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=DEFAULT_ROUTER, help=f"router address (default {DEFAULT_ROUTER})")
    p.add_argument("--admin-key", default=None, help="admin API key (default: $CMESH_ADMIN_KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")


def add_parsers(sub) -> None:
    p = sub.add_parser("apply", help="apply a mesh.yaml to the running mesh (diff, dry run, rollback)",
                       description="Validate a config, show what changes, and apply it to the autoscaler "
                                   "and every router without a restart; refused whole with every error.")
    p.add_argument("file", nargs="?", help="the mesh.yaml to apply")
    p.add_argument("--dry-run", action="store_true", help="validate and show the diff; apply nothing")
    p.add_argument("--rollback", action="store_true", help="return to the config before the current one")
    _common(p)
    p.set_defaults(func=_cmd_apply)
    config = sub.add_parser("config", help="the history of applied configs")
    csub = config.add_subparsers(dest="config_command", required=True)
    h = csub.add_parser("history", help="applied configs, newest first (* marks the one in force)")
    h.add_argument("--limit", type=int, default=20)
    _common(h)
    h.set_defaults(func=_cmd_history)
    rollout = sub.add_parser("rollout", help="canary rollouts")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)
    s = rsub.add_parser("status", help="each rollout's state, step and measured figures")
    s.add_argument("model", nargs="?", help="one model (default: every rollout)")
    _common(s)
    s.set_defaults(func=_cmd_rollout)
