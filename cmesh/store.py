"""The model store: ``<root>/<name>/<version>/model.yaml`` plus files.

The root is a local path or any fsspec URL (``file://``, ``s3://``, ``memory://``).
Remote versions are copied once into a local cache so engines always load from
a directory on disk.

A version is visible to readers only when it is complete (``cmesh.completion``):
on a remote store, when its ``.cmesh-complete`` marker exists (uploaded last);
on a local store, also when it has a ``model.yaml`` and no marker, because every
local writer (bootstrap, push) builds a version under a hidden name and renames
it into place, so a local version directory is never half-written. Stores built
before markers existed stay readable locally; remote ones must be pushed again.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec

from cmesh import completion
from cmesh.completion import COMPLETE_FILE, Completion
from cmesh.errors import NotFound, quote
from cmesh.manifest import MANIFEST_FILE, Manifest, parse_manifest

SCHEME = "store://"
# A model or version name is one path segment; a leading dot is reserved for
# staging directories, which readers never list.
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

VersionState = Literal["absent", "incomplete", "complete"]


@dataclass(frozen=True)
class ModelVersion:
    source: str           # as configured, e.g. store://minilm-l6/1
    url: str              # resolved location in the store
    local_dir: Path       # directory the engine loads from
    manifest: Manifest


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs) -> bool:
    return bool({"file", "local"} & set(_protocols(fs)))


class ModelStore:
    def __init__(self, root: str, cache_dir: str | os.PathLike | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        """``storage_options`` go to fsspec (e.g. s3fs's ``endpoint_url``); the
        caller reads them from its flags or environment."""
        self.root = root.rstrip("/") or root
        self.storage_options = dict(storage_options or {})
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = is_local(self.fs)
        self.cache_dir = Path(cache_dir) if cache_dir else Path(".cmesh/cache")

    def resolve(self, source: str) -> str:
        """store://name/version -> URL under the root; other sources pass through."""
        if source.startswith(SCHEME):
            rel = source[len(SCHEME):].strip("/")
            if rel.count("/") != 1 or not all(SEGMENT_RE.match(p) for p in rel.split("/")):
                raise NotFound(f"model source {source!r} must look like store://<name>/<version>")
            return f"{self.root}/{rel}"
        return source

    def version_path(self, name: str, version: str) -> str:
        """The version's path in ``self.fs`` (no protocol)."""
        return f"{self._root_path.rstrip('/')}/{name}/{version}"

    def state(self, name: str, version: str) -> VersionState:
        """complete (readers see it), incomplete (files but no marker: an upload in
        progress or interrupted), or absent."""
        path = self.version_path(name, version)
        self.fs.invalidate_cache(path)
        return self._state(self.fs, path)

    def _state(self, fs, path: str) -> VersionState:
        if fs.exists(f"{path}/{COMPLETE_FILE}"):
            return "complete"
        if is_local(fs) and fs.exists(f"{path}/{MANIFEST_FILE}"):
            return "complete"         # legacy local version: renamed into place whole
        return "incomplete" if fs.exists(path) and fs.ls(path) else "absent"

    def _complete(self, source: str) -> tuple[Any, str, str]:
        """(fs, path, url) of a complete version; NotFound naming it otherwise."""
        url = self.resolve(source)
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        path = path.rstrip("/")
        fs.invalidate_cache(path)       # s3fs caches listings: a replica must see a new push
        state = self._state(fs, path)
        if state == "absent" or (state == "complete" and not fs.exists(f"{path}/{MANIFEST_FILE}")):
            raise NotFound(f"no {MANIFEST_FILE} at {url} (run `cmesh models bootstrap`, or "
                           f"`cmesh models push`?)")
        if state == "incomplete":
            raise NotFound(f"model version {quote(source)} at {url} is not complete: it has no "
                           f"{COMPLETE_FILE} marker (an upload in progress or interrupted); "
                           f"push it again with `cmesh models push --force`")
        return fs, path, url

    def manifest(self, source: str) -> Manifest:
        """A complete version's manifest, without copying its files."""
        fs, path, url = self._complete(source)
        with fs.open(f"{path}/{MANIFEST_FILE}", "r") as fh:
            return parse_manifest(fh.read(), source=f"{url}/{MANIFEST_FILE}")

    def open(self, source: str) -> ModelVersion:
        """A complete version, copied into the cache first when the store is remote."""
        fs, path, url = self._complete(source)
        if is_local(fs):
            local_dir = Path(path)
        else:
            with fs.open(f"{path}/{COMPLETE_FILE}", "r") as fh:
                marker = completion.parse(fh.read(), source=f"{url}/{COMPLETE_FILE}")
            local_dir = self._materialize(fs, path, url, marker)
        manifest = parse_manifest((local_dir / MANIFEST_FILE).read_text(), source=f"{url}/{MANIFEST_FILE}")
        return ModelVersion(source=source, url=url, local_dir=local_dir, manifest=manifest)

    def _materialize(self, fs, path: str, url: str, marker: Completion) -> Path:
        """The cached copy of exactly the marker's files, keyed by URL and push id.
        Downloaded into a hidden directory and renamed, so concurrent replicas on
        one host never load a half-copied version."""
        digest = hashlib.sha256(f"{url}\n{marker.push_id}".encode()).hexdigest()[:16]
        target = self.cache_dir / digest
        if (target / COMPLETE_FILE).exists():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=self.cache_dir))
        try:
            rels = sorted(marker.files)
            for rel in rels:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get([f"{path}/{rel}" for rel in rels], [str(tmp / rel) for rel in rels])
            problems = completion.mismatches(tmp, marker)
            if problems:       # replaced (--force) while we copied: the next load retries
                raise NotFound(f"{url} changed while it was copied ({'; '.join(problems[:3])}); "
                               f"load it again")
            (tmp / COMPLETE_FILE).write_text(completion.dump(marker))
            if target.exists():          # an old-style or broken entry: replace it
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:              # another process finished first
                if not (target / COMPLETE_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def versions(self) -> list[tuple[str, str]]:
        """(name, version) for every complete version (see the module docstring)."""
        root = self._root_path.rstrip("/")
        self.fs.invalidate_cache(root)
        if not self.fs.exists(root):
            return []
        markers = [COMPLETE_FILE, MANIFEST_FILE] if self.local else [COMPLETE_FILE]
        found = set()
        for marker in markers:
            for hit in self.fs.glob(f"{root}/*/*/{marker}"):
                name, version = hit.rstrip("/").split("/")[-3:-1]
                if SEGMENT_RE.match(name) and SEGMENT_RE.match(version):   # not a staging dir
                    found.add((name, version))
        return sorted(found)
