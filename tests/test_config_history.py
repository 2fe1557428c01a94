"""autoscaler.config_history: applied configs on disk, what a reopen sees, and
what a rollback returns to."""
from __future__ import annotations

import hashlib
import json

import pytest

from autoscaler.config_history import INDEX, ConfigHistory, Record

YAML = 'models:\n  m: {{source: "store://x/{}"}}\n'


class Wall:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def history(tmp_path, **kw) -> ConfigHistory:
    return ConfigHistory(tmp_path / "history", wall=Wall(), **kw)


def test_record_writes_snapshot_and_index(tmp_path) -> None:
    h = history(tmp_path)
    assert h.current() is None and h.records() == [] and h.rollback_target() is None
    text = YAML.format(1)
    r = h.record(text, applied_by="key-ops", source="apply", note="first")
    sha = hashlib.sha256(text.encode()).hexdigest()
    assert r == Record(id=f"c00001-{sha[:8]}", applied_at=1001.0, applied_by="key-ops",
                       source="apply", sha256=sha, note="first")
    assert h.current() == r and h.get(r.id) == r and h.text(r.id) == text
    assert h.path(r.id) == tmp_path / "history" / f"{r.id}.yaml"
    lines = (tmp_path / "history" / INDEX).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": r.id, "applied_at": 1001.0, "applied_by": "key-ops", "source": "apply",
         "sha256": sha, "note": "first"}]
    assert [p.name for p in (tmp_path / "history").iterdir() if p.name.endswith(".tmp")] == []


def test_records_newest_first_with_limit(tmp_path) -> None:
    h = history(tmp_path)
    made = [h.record(YAML.format(i), "k", "apply") for i in range(5)]
    assert h.records() == made[::-1]
    assert h.records(limit=2) == [made[4], made[3]]
    assert h.records(limit=0) == []
    assert [r.id[:6] for r in made] == ["c00001", "c00002", "c00003", "c00004", "c00005"]


def test_sequence_continues_across_reopen(tmp_path) -> None:
    h = history(tmp_path)
    first = [h.record(YAML.format(i), "k", "apply") for i in range(3)]
    again = history(tmp_path)
    assert again.records() == first[::-1]
    r = again.record(YAML.format(1), "k", "apply")  # same text, new id
    assert r.id.startswith("c00004-") and r.sha256 == first[1].sha256


def test_unknown_ids_and_sources_are_refused(tmp_path) -> None:
    h = history(tmp_path)
    assert h.get("c00001-deadbeef") is None
    with pytest.raises(KeyError):
        h.path("../../etc/passwd")
    with pytest.raises(KeyError):
        h.text("c00001-deadbeef")
    with pytest.raises(ValueError, match="source"):
        h.record(YAML.format(1), "k", "typo")
    with pytest.raises(ValueError, match="keep"):
        history(tmp_path, keep=0)


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path) -> None:
    h = history(tmp_path)
    a = h.record(YAML.format(1), "k", "apply")
    b = h.record(YAML.format(2), "k", "apply")
    index = tmp_path / "history" / INDEX
    whole = index.read_text()
    index.write_text(whole[: whole.rindex("\n", 0, len(whole) - 1) + 1] + whole.splitlines()[-1][:30])
    reopened = history(tmp_path)
    assert reopened.records() == [a]
    c = reopened.record(YAML.format(3), "k", "apply")
    assert c.id.startswith("c00003-")  # b's snapshot is on disk: its number is not reused
    assert history(tmp_path).records() == [c, a]
    assert b.id not in {r.id for r in history(tmp_path).records()}


def test_garbage_lines_are_skipped(tmp_path) -> None:
    h = history(tmp_path)
    a = h.record(YAML.format(1), "k", "apply")
    index = tmp_path / "history" / INDEX
    with index.open("a") as f:
        f.write("[1, 2]\n\n{\"id\": \"../x\", \"applied_at\": 1, \"applied_by\": \"k\", "
                "\"source\": \"apply\", \"sha256\": \"s\"}\n{\"id\": 5}\nnot json\n")
    assert history(tmp_path).records() == [a]


def test_missing_snapshot_skips_its_record(tmp_path) -> None:
    h = history(tmp_path)
    a, b, c = (h.record(YAML.format(i), "k", "apply") for i in range(3))
    h.path(b.id).unlink()
    reopened = history(tmp_path)
    assert reopened.records() == [c, a] and reopened.get(b.id) is None
    assert reopened.rollback_target() == a


def test_rollback_target_without_rollout_records(tmp_path) -> None:
    h = history(tmp_path)
    a = h.record(YAML.format(1), "", "file")
    assert h.rollback_target() is None  # nothing before the first record
    b = h.record(YAML.format(2), "k", "apply")
    assert h.rollback_target() == a
    back = h.record(h.text(a.id), "k", "rollback")
    assert back.sha256 == a.sha256
    assert h.rollback_target() == b  # a second rollback undoes the first


def test_rollback_target_skips_the_canary_drivers_records(tmp_path) -> None:
    h = history(tmp_path)
    a = h.record(YAML.format(1), "k", "apply")
    h.record(YAML.format(2), "k", "apply")
    h.record(YAML.format(3), "canary", "rollout")
    h.record(YAML.format(4), "canary", "rollout")
    assert h.rollback_target() == a
    h.record(YAML.format(5), "k", "sighup")
    step = h.records()[1]
    assert step.source == "rollout" and step.sha256 == hashlib.sha256(YAML.format(4).encode()).hexdigest()
    assert h.rollback_target() == step  # the last canary step was in force
    assert history(tmp_path).rollback_target() == step


def test_only_rollout_records_have_no_target(tmp_path) -> None:
    h = history(tmp_path)
    h.record(YAML.format(1), "canary", "rollout")
    h.record(YAML.format(2), "canary", "rollout")
    assert h.rollback_target() is None


def test_last_file_sha(tmp_path) -> None:
    h = history(tmp_path)
    assert h.last_file_sha() is None
    h.record(YAML.format(1), "k", "apply")
    assert h.last_file_sha() is None
    f = h.record(YAML.format(2), "", "file")
    h.record(YAML.format(3), "k", "apply")
    assert h.last_file_sha() == f.sha256
    s = h.record(YAML.format(4), "", "sighup")
    h.record(YAML.format(5), "canary", "rollout")
    assert h.last_file_sha() == s.sha256
    assert history(tmp_path).last_file_sha() == s.sha256


def test_pruning_keeps_the_newest(tmp_path) -> None:
    h = history(tmp_path, keep=3)
    made = [h.record(YAML.format(i), "k", "apply") for i in range(6)]
    assert h.records(limit=10) == made[:2:-1]
    snapshots = sorted(p.stem for p in (tmp_path / "history").glob("*.yaml"))
    assert snapshots == [r.id for r in made[3:]]
    reopened = history(tmp_path, keep=3)
    assert reopened.records(limit=10) == made[:2:-1]
    assert len((tmp_path / "history" / INDEX).read_text().splitlines()) == 3
    assert reopened.record(YAML.format(9), "k", "apply").id.startswith("c00007-")


def test_pruning_keeps_current_and_the_rollback_target(tmp_path) -> None:
    h = history(tmp_path, keep=1)
    a = h.record(YAML.format(1), "k", "apply")
    b = h.record(YAML.format(2), "k", "apply")
    assert h.records() == [b, a]  # a is b's rollback target
    steps = [h.record(YAML.format(i), "canary", "rollout") for i in range(3, 6)]
    assert h.records() == [steps[-1], b, a]
    assert h.rollback_target() == a and h.text(a.id) == YAML.format(1)
    assert history(tmp_path, keep=1).records() == [steps[-1], b, a]
    c = h.record(YAML.format(7), "k", "apply")
    assert h.records() == [c, steps[-1]]
    assert sorted(p.stem for p in (tmp_path / "history").glob("*.yaml")) == sorted([c.id, steps[-1].id])
