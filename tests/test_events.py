"""The typed interruption record writes the same events/ JSON the untyped dict did."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from spotd.events import DurableCheckpoint, InterruptionRecord, NoticeKind

T0 = datetime(2026, 11, 25, 4, 0, 0, 123456, tzinfo=UTC)

#: What the coordinator's 20-key dict gave ``json.dumps(record, default=str, sort_keys=True)`` for the
#: episode below, captured from the code before the record was typed: the events/ files already stored.
BEFORE = (
    '{"action": "terminate", "bytes": 4096, "checkpoint_seconds": 1.488, "deadline": '
    '"2026-11-25T04:01:50.123Z", "detect_seconds": 0.012, "detected_at": "2026-11-25T04:00:00.123Z", '
    '"durable": [{"name": "n1", "step": 5, "trainer": "rank0"}], "final": true, "instance_id": "i-0abc", '
    '"instance_type": "g5.xlarge", "kind": "spot", "lost": ["rank2: no checkpoint before the deadline", '
    '"rank1: upload failed (boom)"], "notice_time": "2026-11-25T04:02:00.123Z", '
    '"notice_to_durable_seconds": 2.346, "reason": "spot-terminate", "request_id": "0123456789abcdef", '
    '"trainers": 3, "upload_seconds": 1.111}'
)


def record(**changes: object) -> InterruptionRecord:
    fields: dict[str, object] = {
        "request_id": "0123456789abcdef",
        "kind": NoticeKind.SPOT,
        "action": "terminate",
        "reason": "spot-terminate",
        "final": True,
        "instance_id": "i-0abc",
        "instance_type": "g5.xlarge",
        "notice_time": T0 + timedelta(seconds=120),
        "detected_at": T0,
        "deadline": T0 + timedelta(seconds=110),
        "detect_seconds": 0.012346,
        "checkpoint_seconds": 101.5 - 100.0123456,
        "upload_seconds": 102.3456789 - 101.23456,
        "notice_to_durable_seconds": 102.3456789 - 100.0,
        "total_bytes": 4096,
        "trainers": 3,
        "durable": (DurableCheckpoint(trainer="rank0", name="n1", step=5),),
        "lost": ("rank2: no checkpoint before the deadline", "rank1: upload failed (boom)"),
    }
    fields.update(changes)
    return InterruptionRecord(**fields)  # type: ignore[arg-type]


def test_to_json_is_byte_for_byte_the_events_file_of_before():
    """to_json() gives the same bytes (keys, RFC 3339 'Z' millisecond times, seconds rounded to ms) as the old dict."""
    assert record().to_json().decode() == BEFORE


def test_absent_figures_are_null_and_times_are_utc_z():
    """A notice without a time and an episode with nothing saved give nulls; a non-UTC time is written in UTC with Z."""
    east = datetime(2026, 11, 25, 8, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    out = json.loads(
        record(
            notice_time=None,
            detected_at=east,
            checkpoint_seconds=None,
            upload_seconds=None,
            notice_to_durable_seconds=None,
            durable=(),
        ).to_json()
    )
    assert out["notice_time"] is None and out["detected_at"] == "2026-11-25T06:00:00.000Z"
    assert out["checkpoint_seconds"] is None and out["upload_seconds"] is None
    assert out["notice_to_durable_seconds"] is None and out["durable"] == []


def test_to_dict_is_the_log_lines_fields():
    """to_dict() has the same keys as the JSON file, lists where the record holds tuples, so a log line and the file agree."""
    value = record()
    assert value.to_dict() == json.loads(value.to_json())
