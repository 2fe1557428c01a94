"""The model store: ``<root>/<name>/<version>/model.yaml`` plus files.

The root is a local path or any fsspec URL (``file://``, ``s3://``, ``memory://``).
Remote versions are copied once into a local cache so engines always load from
a directory on disk.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec

from cmesh.errors import NotFound
from cmesh.manifest import MANIFEST_FILE, Manifest, parse_manifest

SCHEME = "store://"


@dataclass(frozen=True)
class ModelVersion:
    source: str           # as configured, e.g. store://minilm-l6/1
    url: str              # resolved location in the store
    local_dir: Path       # directory the engine loads from
    manifest: Manifest


class ModelStore:
    def __init__(self, root: str, cache_dir: str | os.PathLike | None = None) -> None:
        self.root = root.rstrip("/") or root
        self._fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self._local = "file" in (self._fs.protocol if isinstance(self._fs.protocol, tuple)
                                 else (self._fs.protocol,))
        self.cache_dir = Path(cache_dir) if cache_dir else Path(".cmesh/cache")

    def resolve(self, source: str) -> str:
        """store://name/version -> URL under the root; other sources pass through."""
        if source.startswith(SCHEME):
            rel = source[len(SCHEME):].strip("/")
            if rel.count("/") != 1 or ".." in rel.split("/"):
                raise NotFound(f"model source {source!r} must look like store://<name>/<version>")
            return f"{self.root}/{rel}"
        return source

    def open(self, source: str) -> ModelVersion:
        url = self.resolve(source)
        fs, path = fsspec.core.url_to_fs(url)
        manifest_path = f"{path.rstrip('/')}/{MANIFEST_FILE}"
        if not fs.exists(manifest_path):
            raise NotFound(f"no {MANIFEST_FILE} at {url} (run `cmesh models bootstrap`?)")
        with fs.open(manifest_path, "r") as fh:
            manifest = parse_manifest(fh.read(), source=f"{url}/{MANIFEST_FILE}")
        return ModelVersion(source=source, url=url, local_dir=self._materialize(fs, path, url),
                            manifest=manifest)

    def _materialize(self, fs, path: str, url: str) -> Path:
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols or "local" in protocols:
            return Path(path)
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        target = self.cache_dir / digest
        done = target / ".complete"
        if not done.exists():
            target.mkdir(parents=True, exist_ok=True)
            fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)
            done.touch()
        return target

    def versions(self) -> list[tuple[str, str]]:
        """(name, version) for every version directory that has a manifest."""
        found = []
        if not self._fs.exists(self._root_path):
            return found
        for manifest in self._fs.glob(f"{self._root_path.rstrip('/')}/*/*/{MANIFEST_FILE}"):
            parts = manifest.rstrip("/").split("/")
            found.append((parts[-3], parts[-2]))
        return sorted(found)
