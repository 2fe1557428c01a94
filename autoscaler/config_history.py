"""A file-backed history of applied configs (``cmesh apply``, its ``--rollback``,
reloads and the canary driver's steps).

One directory: ``history.jsonl``, one record a line, oldest first, and one
``<id>.yaml`` snapshot per record, the exact text applied (replicas are started
with ``--config`` pointing at it). A snapshot is written and renamed into place
before its index line is appended, so a reader never sees an index entry
without its file; a torn last line or a snapshot gone missing is skipped on
load. One writer at a time (the autoscaler leader); everything is synchronous
and small, so the caller runs it where it likes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

INDEX = "history.jsonl"
# Who wrote a record. "rollout" records come from the canary driver; the rest are
# an operator's (or the operator's file), which is what a rollback undoes.
OPERATOR_SOURCES = frozenset({"apply", "sighup", "file", "rollback"})
SOURCES = OPERATOR_SOURCES | {"rollout"}
FILE_SOURCES = frozenset({"file", "sighup"})
_ID = re.compile(r"^c(\d{5,})-[0-9a-f]{8}$")


@dataclass(frozen=True)
class Record:
    """One applied config; its YAML text lives in the snapshot file ``<id>.yaml``."""

    id: str
    applied_at: float       # wall-clock seconds (for people, never for timeouts)
    applied_by: str         # admin key id; "" for the file at start-up
    source: str             # one of SOURCES
    sha256: str             # of the YAML text
    note: str = ""


class ConfigHistory:
    def __init__(self, directory: Path, wall: Callable[[], float] = time.time, keep: int = 200) -> None:
        if keep < 1:
            raise ValueError("keep: must be >= 1 (the current config is always kept)")
        self._dir = Path(directory)
        self._wall = wall
        self._keep = keep
        self._dir.mkdir(parents=True, exist_ok=True)
        self._records, self._last_seq = self._load()
        self._by_id = {r.id: r for r in self._records}

    # --- reading ------------------------------------------------------------------

    def current(self) -> Record | None:
        return self._records[-1] if self._records else None

    def records(self, limit: int = 20) -> list[Record]:
        """Newest first."""
        return self._records[::-1][: max(limit, 0)]

    def get(self, id: str) -> Record | None:
        return self._by_id.get(id)

    def path(self, id: str) -> Path:
        """The snapshot file of a recorded id (KeyError for any other, so an id from
        a caller never names a path outside the directory)."""
        if id not in self._by_id:
            raise KeyError(id)
        return self._snapshot(id)

    def text(self, id: str) -> str:
        return self.path(id).read_text(encoding="utf-8")

    def rollback_target(self) -> Record | None:
        """The config in force just before the newest operator record: the record
        preceding it, whatever wrote that one (canary steps included). None when
        the newest operator record is the first, or there is none."""
        i = self._newest_operator_index()
        return self._records[i - 1] if i is not None and i > 0 else None

    def last_file_sha(self) -> str | None:
        """sha256 of the config file as last loaded (source "file" or "sighup")."""
        for record in reversed(self._records):
            if record.source in FILE_SOURCES:
                return record.sha256
        return None

    # --- writing ------------------------------------------------------------------

    def record(self, yaml_text: str, applied_by: str, source: str, note: str = "") -> Record:
        if source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(sorted(SOURCES))}, not {source!r}")
        data = yaml_text.encode("utf-8")
        sha = hashlib.sha256(data).hexdigest()
        seq = self._last_seq + 1
        record = Record(id=f"c{seq:05d}-{sha[:8]}", applied_at=float(self._wall()),
                        applied_by=applied_by, source=source, sha256=sha, note=note)
        _write_atomic(self._snapshot(record.id), data)
        self._append_index(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._records.append(record)
        self._by_id[record.id] = record
        self._last_seq = seq
        self._prune()
        return record

    # --- internals ----------------------------------------------------------------

    def _snapshot(self, id: str) -> Path:
        return self._dir / f"{id}.yaml"

    def _newest_operator_index(self) -> int | None:
        for i in range(len(self._records) - 1, -1, -1):
            if self._records[i].source in OPERATOR_SOURCES:
                return i
        return None

    def _load(self) -> tuple[list[Record], int]:
        # The sequence continues past every id on disk, snapshots without an index
        # line (a crash between the two writes) included, so no id is reused.
        last = max((_seq(p.stem) for p in self._dir.glob("c*.yaml")), default=0)
        index = self._dir / INDEX
        try:
            lines = index.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        records: list[Record] = []
        seen: set[str] = set()
        for line in lines:
            record = _parse(line)
            if record is None or record.id in seen:
                continue  # a torn or foreign line
            last = max(last, _seq(record.id))
            if self._snapshot(record.id).is_file():
                records.append(record)
                seen.add(record.id)
        return records, last

    def _append_index(self, line: str) -> None:
        with open(self._dir / INDEX, "a+b") as f:
            # A torn last line (no newline) must not swallow the new one.
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _prune(self) -> None:
        if len(self._records) <= self._keep:
            return
        # The current record is the newest, always within keep; the rollback target
        # and the record it undoes are kept too, however many canary steps followed.
        protected = {self._records[-1].id}
        i = self._newest_operator_index()
        if i is not None:
            protected |= {r.id for r in self._records[max(i - 1, 0): i + 1]}
        cut = len(self._records) - self._keep
        dropped = [r for r in self._records[:cut] if r.id not in protected]
        if not dropped:
            return
        gone = {r.id for r in dropped}
        self._records = [r for r in self._records if r.id not in gone]
        for id in gone:
            del self._by_id[id]
        # The index is rewritten first, then snapshots go: an entry never outlives
        # its file, and the index does not grow without bound.
        lines = "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in self._records)
        _write_atomic(self._dir / INDEX, lines.encode("utf-8"))
        for id in sorted(gone):
            self._snapshot(id).unlink(missing_ok=True)


def _parse(line: str) -> Record | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    names = {f.name for f in fields(Record)}
    values = {k: v for k, v in obj.items() if k in names}   # newer fields are ignored
    try:
        record = Record(**values)
    except TypeError:
        return None
    text_fields = (record.id, record.applied_by, record.source, record.sha256, record.note)
    if (not all(isinstance(v, str) for v in text_fields) or not _ID.match(record.id)
            or isinstance(record.applied_at, bool) or not isinstance(record.applied_at, (int, float))):
        return None
    return replace(record, applied_at=float(record.applied_at))


def _seq(id: str) -> int:
    match = _ID.match(id)
    return int(match.group(1)) if match else 0


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the
    directory: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows); the rename itself is atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
