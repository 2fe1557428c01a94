"""Put a model version into the store, atomically for readers.

Local stores: the files are copied into a hidden staging directory next to the
version (``<name>/.<version>.push-<id>``), the marker is written there, and the
directory is renamed into place; a reader sees the whole version or none of it.
Remote stores (S3 and other object stores, which cannot rename a prefix): the
files are uploaded under the version's own prefix, checked against a fresh
listing, and the ``.cmesh-complete`` marker is uploaded last; readers ignore a
version until its marker exists (``cmesh.store``). Replacing a version
(``force``) deletes the old marker first, so readers stop seeing it before any
of its files change.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmesh import completion
from cmesh.completion import COMPLETE_FILE, Completion
from cmesh.manifest import MANIFEST_FILE, Manifest, parse_manifest
from cmesh.store import SEGMENT_RE, ModelStore
from cmesh.validation import ConfigError, read_text


class PushError(Exception):
    """The push was refused or failed; nothing visible changed."""


class VersionExists(PushError):
    pass


@dataclass(frozen=True)
class PushResult:
    url: str
    push_id: str
    files: int
    bytes: int
    replaced: bool


def check_source(src: Path, name: str, version: str) -> Manifest:
    """The manifest of a version directory about to be pushed as ``name/version``;
    ConfigError naming the field when it is not one."""
    for flag, value in (("--model", name), ("--version", version)):
        if not SEGMENT_RE.match(value):
            raise ConfigError(flag, [f"{value!r}: must match {SEGMENT_RE.pattern} (one path segment)"])
    if not src.is_dir():
        raise ConfigError(str(src), ["not a directory"])
    manifest_path = src / MANIFEST_FILE
    manifest = parse_manifest(read_text(manifest_path), source=str(manifest_path))
    wrong = [f"{field}: is {have!r} but {flag} is {want!r}"
             for field, have, want, flag in (("name", manifest.name, name, "--model"),
                                             ("version", manifest.version, version, "--version"))
             if have != want]
    if wrong:
        raise ConfigError(str(manifest_path), wrong)
    return manifest


def push_version(src: Path, store: ModelStore, name: str, version: str, *, force: bool = False,
                 progress: Callable[[str], None] = lambda line: None) -> PushResult:
    """Upload ``src`` as ``name/version``; refuses an existing version unless ``force``."""
    state = store.state(name, version)
    key = f"{name}/{version}"
    if state == "complete" and not force:
        raise VersionExists(f"{key} already exists in {store.root}; pass --force to replace it")
    if state == "incomplete" and not force:
        raise VersionExists(f"{key} has an incomplete upload in {store.root} (in progress or "
                            f"interrupted); pass --force to replace it")
    marker = completion.describe(src)
    if store.local:
        _push_local(src, store, name, version, marker, replace=state != "absent", progress=progress)
    else:
        _push_remote(src, store, name, version, marker, replace=state != "absent", progress=progress)
    return PushResult(url=f"{store.root}/{key}", push_id=marker.push_id, files=len(marker.files),
                      bytes=marker.total_bytes, replaced=state != "absent")


def _push_local(src: Path, store: ModelStore, name: str, version: str, marker: Completion, *,
                replace: bool, progress: Callable[[str], None]) -> None:
    final = Path(store.version_path(name, version))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{version}.push-{marker.push_id}"
    old = final.parent / f".{version}.old-{marker.push_id}"
    try:
        for rel, path in completion.local_files(src).items():
            progress(f"  {rel} ({path.stat().st_size} bytes)")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / rel)
        problems = completion.mismatches(staging, marker)
        if problems:
            raise PushError(f"{src} changed while it was copied: {'; '.join(problems[:3])}")
        (staging / COMPLETE_FILE).write_text(completion.dump(marker))
        if replace and final.exists():
            # Two renames: for that instant the version is absent (NOT_FOUND), never mixed.
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError as exc:           # someone else's push landed first
            raise VersionExists(f"{name}/{version} appeared in {store.root} during the push: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _push_remote(src: Path, store: ModelStore, name: str, version: str, marker: Completion, *,
                 replace: bool, progress: Callable[[str], None]) -> None:
    fs, prefix = store.fs, store.version_path(name, version)
    if replace:
        # The marker goes first: from then on readers treat the version as absent.
        if fs.exists(f"{prefix}/{COMPLETE_FILE}"):
            fs.rm(f"{prefix}/{COMPLETE_FILE}")
        fs.rm(prefix, recursive=True)
    for rel, path in completion.local_files(src).items():
        progress(f"  {rel} ({path.stat().st_size} bytes)")
        fs.put_file(str(path), f"{prefix}/{rel}")
    fs.invalidate_cache(prefix)
    listed = {info["name"].removeprefix(prefix.rstrip("/") + "/"): info.get("size")
              for info in fs.find(prefix, detail=True).values()}
    missing = [f"{rel}: {'missing' if rel not in listed else f'{listed[rel]} bytes, expected {e.size}'}"
               for rel, e in marker.files.items() if listed.get(rel) != e.size]
    if missing:
        raise PushError(f"the upload to {store.root}/{name}/{version} is incomplete "
                        f"({'; '.join(missing[:3])}); it stays invisible - push again with --force")
    fs.pipe_file(f"{prefix}/{COMPLETE_FILE}", completion.dump(marker).encode())
