"""``cmesh models push``, and the ``--store-option`` flag the models commands share."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for the store (repeatable; VALUE is YAML), e.g. "
                             "endpoint_url=http://127.0.0.1:9000 for an S3-compatible server. "
                             "S3 credentials and endpoint also come from AWS_ACCESS_KEY_ID, "
                             "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or FSSPEC_S3_* as boto and "
                             "fsspec read them")


def store_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` flags as fsspec keyword arguments; ValueError names the bad one."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--store-option {pair!r}: must look like KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"--store-option {key}: VALUE is not valid YAML: {exc}") from None
    return options


def _try_load(src: Path, manifest, device: str) -> None:
    """Build the manifest's engine on ``src`` and load, warm up and unload it, as a
    replica would (without the config's per-model overrides)."""
    from model_server.engines.base import EngineContext, engine_class

    ctx = EngineContext(model=manifest.name, variant=manifest.version, model_dir=src, manifest=manifest,
                        device=device, options=dict(manifest.options),
                        max_batch_size=manifest.batching.max_batch_size)
    engine = engine_class(manifest.engine)(ctx)
    engine.load()
    try:
        engine.warmup()
    finally:
        engine.unload()


def _cmd_push(args: argparse.Namespace) -> int:
    from cmesh.push import PushError, check_source, push_version
    from cmesh.store import ModelStore
    from cmesh.validation import ConfigError
    from model_server.engines.base import known_engine

    src = Path(args.dir)
    try:
        manifest = check_source(src, args.model, args.version)
        if not known_engine(manifest.engine):
            raise ConfigError(str(src / "model.yaml"), [f"engine: unknown engine {manifest.engine!r}"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.try_load:
        started = time.monotonic()
        print(f"loading {src} with engine {manifest.engine!r} ...", flush=True)
        try:
            _try_load(src, manifest, args.device)
        except Exception as exc:   # any engine failure is the artifact's fault here
            print(f"error: {src}: the {manifest.engine!r} engine cannot load it: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(f"loaded and warmed up in {time.monotonic() - started:.1f}s", flush=True)
    try:
        options = store_options(args.store_option)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = ModelStore(args.store, storage_options=options)
    print(f"pushing {src} to {store.root}/{args.model}/{args.version}", flush=True)
    started = time.monotonic()
    try:
        result = push_version(src, store, args.model, args.version, force=args.force,
                              progress=lambda line: print(line, flush=True))
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'replaced' if result.replaced else 'pushed'} {result.url}: {result.files} files, "
          f"{result.bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f}s (push {result.push_id})")
    return 0


def add_push_parser(msub, default_store: str) -> None:
    push = msub.add_parser(
        "push", help="upload a model version to the store (atomically)",
        description="Validate DIR's model.yaml (its name and version must match --model and "
                    "--version), optionally load it with its engine, and upload it as "
                    "<store>/<model>/<version>. Readers see the version only once every file is "
                    "there; an existing version is refused unless --force.")
    push.add_argument("dir", metavar="DIR", help="the version directory: model.yaml plus the engine's files")
    push.add_argument("--model", required=True, help="model name in the store")
    push.add_argument("--version", required=True, help="version name in the store")
    push.add_argument("--store", default=default_store,
                      help=f"store root: path, file://, s3://bucket/prefix, any fsspec URL "
                           f"(default {default_store})")
    add_store_options(push)
    push.add_argument("--force", action="store_true", help="replace the version if it exists")
    push.add_argument("--try-load", action="store_true",
                      help="first load and warm up the version with its engine, as a replica would")
    push.add_argument("--device", default="cpu", help="device for --try-load (default cpu)")
    push.set_defaults(func=_cmd_push)
