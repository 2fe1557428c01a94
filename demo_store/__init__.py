"""Build the demo model store offline and idempotently.

Each artifact is built into a temporary directory and renamed into place, with a
build stamp and the completion marker (``cmesh.completion``); a version whose stamp
matches its recipe's fingerprint is skipped.
"""
from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cmesh import completion
from demo_store.base import Artifact, BuildContext
from cmesh.completion import COMPLETE_FILE

STAMP = ".cmesh-build.json"
_MODULES = ("minilm", "classifier", "tiny_llm", "kb_index", "sql_orders")


def all_artifacts() -> list[Artifact]:
    found: list[Artifact] = []
    for name in _MODULES:
        found.extend(importlib.import_module(f"{__name__}.{name}").ARTIFACTS)
    return _ordered(found)


def _ordered(artifacts: list[Artifact]) -> list[Artifact]:
    """Dependencies first (stable otherwise)."""
    by_key = {a.key: a for a in artifacts}
    done: list[Artifact] = []
    seen: set[str] = set()

    def visit(a: Artifact, stack: tuple[str, ...]) -> None:
        if a.key in seen:
            return
        if a.key in stack:
            raise ValueError(f"artifact dependency cycle: {' -> '.join(stack + (a.key,))}")
        for dep in a.depends:
            if dep not in by_key:
                raise ValueError(f"{a.key} depends on unknown artifact {dep}")
            visit(by_key[dep], stack + (a.key,))
        seen.add(a.key)
        done.append(a)

    for a in artifacts:
        visit(a, ())
    return done


@dataclass(frozen=True)
class BuildRecord:
    key: str
    action: str        # "built" or "up to date"
    seconds: float


def is_current(store: Path, artifact: Artifact) -> bool:
    stamp = store / artifact.name / artifact.version / STAMP
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == artifact.fingerprint
    except (OSError, ValueError):
        return False


def bootstrap(store: Path, progress: Callable[[str], None] = print,
              only: Iterable[str] | None = None, force: bool = False) -> list[BuildRecord]:
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(store=store, progress=progress)
    artifacts = all_artifacts()
    wanted = set(only) if only else None
    if wanted:
        unknown = wanted - {a.key for a in artifacts} - {a.name for a in artifacts}
        if unknown:
            raise ValueError(f"unknown artifacts {sorted(unknown)}; known: {[a.key for a in artifacts]}")
    records = []
    for i, artifact in enumerate(artifacts, 1):
        if wanted and artifact.key not in wanted and artifact.name not in wanted:
            continue
        prefix = f"[{i}/{len(artifacts)}] {artifact.key}"
        if not force and is_current(store, artifact):
            progress(f"{prefix}: up to date")
            records.append(BuildRecord(artifact.key, "up to date", 0.0))
            continue
        missing = [d for d in artifact.depends if not is_current(store, _find(artifacts, d))]
        if missing:
            raise RuntimeError(f"{artifact.key} needs {missing} built first")
        progress(f"{prefix}: building")
        started = time.monotonic()
        _build_atomically(store, artifact, ctx)
        seconds = time.monotonic() - started
        progress(f"{prefix}: built in {seconds:.1f}s")
        records.append(BuildRecord(artifact.key, "built", seconds))
    return records


def _find(artifacts: list[Artifact], key: str) -> Artifact:
    return next(a for a in artifacts if a.key == key)


def _build_atomically(store: Path, artifact: Artifact, ctx: BuildContext) -> None:
    parent = store / artifact.name
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / artifact.version
    tmp = Path(tempfile.mkdtemp(prefix=f".{artifact.version}.", dir=parent))
    try:
        artifact.build(tmp, ctx)
        if not (tmp / "model.yaml").exists():
            raise RuntimeError(f"{artifact.key}: recipe wrote no model.yaml")
        (tmp / STAMP).write_text(json.dumps({"fingerprint": artifact.fingerprint,
                                             "built_at": time.time()}))
        # The same marker a push writes, so a bootstrapped version reads as complete anywhere.
        (tmp / COMPLETE_FILE).write_text(completion.dump(completion.describe(tmp)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
