"""The completion marker of a store version: ``<name>/<version>/.cmesh-complete``.

Object stores have no rename, so a version cannot appear all at once: a push
uploads every file first and this marker last, and readers of a remote store
treat a version as present only once its marker exists. The marker lists every
file with its size and SHA-256, so a reader copies exactly those files into its
cache and can tell a finished copy from one that raced an overwrite; its
``push_id`` names the upload, so a version replaced with ``--force`` gets a
fresh cache entry instead of the stale copy.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator

from cmesh.manifest import MANIFEST_FILE
from cmesh.validation import Strict, load_yaml, validate_mapping

COMPLETE_FILE = ".cmesh-complete"
_CHUNK = 1 << 20


class FileEntry(Strict):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Completion(Strict):
    """What a finished upload holds; written as JSON, last."""

    format: Literal[1] = 1
    push_id: str = Field(min_length=1, description="names this upload; part of the cache key")
    pushed_at: str = ""
    files: dict[str, FileEntry] = Field(description="relative POSIX path -> size and digest")

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        # A reader joins these onto its cache directory: nothing may point outside it.
        for rel in files:
            p = PurePosixPath(rel)
            if p.is_absolute() or not p.parts or ".." in p.parts or rel != p.as_posix():
                raise ValueError(f"{rel}: must be a relative path inside the version")
        if MANIFEST_FILE not in files:
            raise ValueError(f"must list {MANIFEST_FILE}")
        return files

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(version_dir: Path) -> dict[str, Path]:
    """Every regular file of a local version directory but its marker, by relative path."""
    return {p.relative_to(version_dir).as_posix(): p for p in sorted(version_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE_FILE}


def describe(version_dir: Path, push_id: str | None = None) -> Completion:
    """The marker for the files now in ``version_dir``."""
    files = {rel: FileEntry(size=p.stat().st_size, sha256=sha256_of(p))
             for rel, p in local_files(version_dir).items()}
    return Completion(push_id=push_id or new_push_id(), files=files,
                      pushed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def new_push_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def dump(completion: Completion) -> str:
    return json.dumps(completion.model_dump(mode="json"), indent=1, sort_keys=True) + "\n"


def parse(text: str, source: str = COMPLETE_FILE) -> Completion:
    return validate_mapping(Completion, load_yaml(text, source), source, not_mapping="must be a mapping")


def mismatches(version_dir: Path, completion: Completion) -> list[str]:
    """Files of ``version_dir`` that differ from the marker (missing, size, digest)."""
    problems = []
    for rel, entry in completion.files.items():
        path = version_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{rel}: {path.stat().st_size} bytes, the marker says {entry.size}")
        elif sha256_of(path) != entry.sha256:
            problems.append(f"{rel}: SHA-256 differs from the marker")
    return problems
