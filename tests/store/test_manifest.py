"""MANIFEST.json, format 1: what a commit records and how it is read back, without any store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotd.errors import StoreError
from spotd.store import CommitInfo, FileEntry, Manifest
from spotd.store.manifest import MANIFEST_FORMAT

DATA = Path(__file__).parent / "data"


def manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "20260101T000000.000000Z-s000000003-t-r0-abcd",
        "job_id": "j",
        "step": 3,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "instance_id": "i",
        "trainer": "t",
        "rank": 0,
        "world_size": 2,
        "request_id": "r",
        "reason": "spot",
        "files": (FileEntry(path="a/b.pt", size=3, checksum="crc32:AAAAAA=="),),
    }
    fields.update(overrides)
    return Manifest(**fields)


def test_round_trip() -> None:
    """A manifest read back from its JSON equals the manifest written."""
    m = manifest()
    assert Manifest.from_json(m.to_json()) == m


def test_round_trip_with_nulls() -> None:
    """step, rank, world_size and request_id may be null and come back as None."""
    m = manifest(step=None, rank=None, world_size=None, request_id=None)
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("fixture", ["manifest-format1.json", "manifest-format1-nulls.json"])
def test_manifest_written_by_the_old_code_parses_and_is_rewritten_byte_for_byte(fixture: str) -> None:
    """A MANIFEST.json written by spotd before the store split parses, and writing it again gives the same bytes."""
    old = (DATA / fixture).read_bytes()
    m = Manifest.from_json(old)
    assert m.format == MANIFEST_FORMAT == 1
    assert m.to_json() == old


def test_old_manifest_values() -> None:
    """Every field of an old manifest lands where it belongs, total_bytes included."""
    m = Manifest.from_json((DATA / "manifest-format1.json").read_bytes())
    assert (m.job_id, m.step, m.trainer, m.rank, m.world_size) == ("mono-to-3d", 500, "train", 1, 2)
    assert (m.request_id, m.reason, m.instance_id) == ("req-7", "spot", "i-0123456789abcdef0")
    assert m.created_at == datetime(2026, 11, 25, 4, 0, 0, 123456, tzinfo=UTC)
    assert [f.path for f in m.files] == ["step_500/model.pt", "step_500/optim.pt"]
    assert m.total_bytes == 1048576


def test_of_commit_copies_what_the_trainer_said_and_does_not_record_final() -> None:
    """A manifest made from a CommitInfo carries each of its fields; `final` steers the daemon and is not written."""
    info = CommitInfo(
        job_id="j",
        step=7,
        trainer="t",
        rank=1,
        world_size=2,
        request_id="q",
        reason="spot",
        instance_id="i-1",
        final=True,
    )
    m = Manifest.of_commit(info, name="n", created_at=datetime(2026, 1, 1, tzinfo=UTC), files=())
    assert (m.job_id, m.step, m.trainer, m.rank, m.world_size) == ("j", 7, "t", 1, 2)
    assert (m.request_id, m.reason, m.instance_id) == ("q", "spot", "i-1")
    assert "final" not in json.loads(m.to_json())


def test_naive_created_at_is_read_as_utc() -> None:
    """A created_at without a zone is taken as UTC."""
    body = manifest().to_json().replace(b'"2026-01-01T00:00:00Z"', b'"2026-01-01T00:00:00"')
    assert Manifest.from_json(body).created_at == datetime(2026, 1, 1, tzinfo=UTC)


def edit(**changes: Any) -> bytes:
    raw = json.loads(manifest().to_json())
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (edit(step="3"), "field 'step' is '3'"),
        (edit(rank=True), "field 'rank' is True"),
        (edit(trainer=None), "field 'trainer' is None"),
        (
            edit(files=[{"path": "../../etc/passwd", "size": 1, "checksum": "crc32:AAAAAA=="}]),
            "not a relative path",
        ),
        (
            edit(files=[{"path": "/etc/passwd", "size": 1, "checksum": "crc32:AAAAAA=="}]),
            "not a relative path",
        ),
        (edit(files=[{"path": "a", "size": -1, "checksum": "crc32:AAAAAA=="}]), "has size -1"),
        (edit(files=[{"path": "a", "size": 1, "checksum": "md5:AAAA"}]), "has checksum 'md5:AAAA'"),
        (edit(files=["a"]), "a files entry is not an object"),
        (edit(created_at="yesterday"), "is not an ISO time"),
    ],
)
def test_bad_manifest_is_a_store_error_naming_the_problem_and_the_fix(body: bytes, problem: str) -> None:
    """A damaged MANIFEST.json raises StoreError saying what is wrong and to delete that checkpoint."""
    with pytest.raises(StoreError, match="delete that checkpoint") as caught:
        Manifest.from_json(body)
    assert problem in str(caught.value)


def test_unknown_format_says_to_upgrade() -> None:
    """A manifest of a format this spotd does not read says to upgrade spotd."""
    with pytest.raises(StoreError, match=r"format 9.*fix: upgrade spotd"):
        Manifest.from_json(edit(format=9))


def test_node_fields_round_trip_and_are_absent_unless_set() -> None:
    """A part's nodes, node and ranks, and a global manifest's nodes, come back as written; a manifest without them has none of the keys (format 1 bytes unchanged)."""
    part = manifest(rank=None, world_size=4, nodes=2, node=1, ranks=(2, 3))
    assert Manifest.from_json(part.to_json()) == part and part.is_part and not part.covers_every_rank
    whole = manifest(rank=None, world_size=4, nodes=2)
    assert Manifest.from_json(whole.to_json()) == whole and whole.covers_every_rank
    assert not {"nodes", "node", "ranks"} & set(json.loads(manifest().to_json()))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"nodes": 0}, "field 'nodes' is 0"),
        ({"nodes": 2, "node": 2}, "field 'node' is 2 with nodes 2"),
        ({"node": 0}, "field 'node' is 0 with nodes None"),
        ({"nodes": 2, "node": 0, "ranks": [0, 0]}, "field 'ranks' is [0, 0]"),
        ({"nodes": 2, "node": 0, "ranks": [-1]}, "field 'ranks' is [-1]"),
    ],
)
def test_bad_node_fields_are_refused(changes: dict[str, Any], problem: str) -> None:
    """Impossible node fields make the manifest invalid, naming the field."""
    with pytest.raises(StoreError, match="delete that checkpoint") as caught:
        Manifest.from_json(edit(**changes))
    assert problem in str(caught.value)
