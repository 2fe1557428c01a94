"""``cmesh models``: bootstrap the demo store, list a store, push a version."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cmesh.cli.defaults import DEFAULT_STORE
from cmesh.cli.push import add_push_parser, add_store_options, store_options


def _cmd_models_bootstrap(args: argparse.Namespace) -> int:
    from demo_store import bootstrap

    store = Path(args.store)
    started = time.monotonic()
    print(f"bootstrapping the demo model store in {store}", flush=True)
    records = bootstrap(store, progress=lambda line: print(line, flush=True),
                        only=args.only or None, force=args.force)
    built = sum(1 for r in records if r.action == "built")
    print(f"done in {time.monotonic() - started:.1f}s: {built} built, "
          f"{len(records) - built} up to date", flush=True)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from cmesh.store import ModelStore

    store = ModelStore(args.store, storage_options=store_options(args.store_option))
    rows = []
    for name, version in store.versions():
        m = store.manifest(f"store://{name}/{version}")
        rows.append({"model": f"{name}/{version}", "engine": m.engine, "memory_mb": m.memory_mb,
                     "inputs": [f"{t.name}:{t.datatype}{t.shape}" for t in m.inputs],
                     "outputs": [f"{t.name}:{t.datatype}{t.shape}" for t in m.outputs]})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models in {args.store}; run `cmesh models bootstrap --store {args.store}`")
    else:
        width = max(len(r["model"]) for r in rows)
        for r in rows:
            print(f"{r['model']:<{width}}  {r['engine']:<14} {r['memory_mb']:>5} MB  "
                  f"in={','.join(r['inputs'])}  out={','.join(r['outputs'])}")
    return 0


def add_parsers(sub) -> None:
    models = sub.add_parser("models", help="the model store", description="Manage the model store.")
    msub = models.add_subparsers(dest="models_command", required=True)
    boot = msub.add_parser("bootstrap", help="build the demo model store offline (idempotent)",
                           description="Build the demo models into the store: MiniLM, the intent "
                                       "classifier (trained here), two tiny LLMs, the KB index and "
                                       "the orders database. Versions already built are skipped.")
    boot.add_argument("--store", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    boot.add_argument("--only", action="append", metavar="NAME[/VERSION]",
                      help="build only this artifact (repeatable)")
    boot.add_argument("--force", action="store_true", help="rebuild even when up to date")
    boot.set_defaults(func=_cmd_models_bootstrap)
    lst = msub.add_parser("list", help="list the versions in a store",
                          description="List every model version in the store with its manifest.")
    lst.add_argument("--store", default=DEFAULT_STORE, help="store root: path or fsspec URL (s3://...)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_models_list)

    add_store_options(lst)
    add_push_parser(msub, DEFAULT_STORE)


