"""The NDJSON wire format: one object per line, at most 64 KiB, every message with an op."""

from __future__ import annotations

import pytest

from spotd import protocol
from spotd.errors import ProtocolError


def test_round_trip_is_one_compact_line():
    """encode gives one newline-terminated compact JSON line that decode reads back."""
    frame = protocol.encode({"op": "saved", "request_id": None, "path": "a/ü.pt", "step": 3})
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1 and b" " not in frame
    assert protocol.decode(frame) == {"op": "saved", "request_id": None, "path": "a/ü.pt", "step": 3}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", protocol.E_BAD_JSON),
        (b"\xff\xfe", protocol.E_BAD_JSON),
        (b"[1, 2]", protocol.E_BAD_FRAME),
        (b'{"op": 3}', protocol.E_BAD_FRAME),
        (b'{"x": 1}', protocol.E_BAD_FRAME),
        (b'{"op": "x", "pad": "' + b"a" * protocol.MAX_LINE + b'"}', protocol.E_TOO_LONG),
    ],
)
def test_bad_lines_raise_protocol_errors_with_a_code(line, code):
    """Invalid JSON, non-objects, a missing op and over-long lines each raise ProtocolError with their code."""
    with pytest.raises(ProtocolError) as err:
        protocol.decode(line)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"op": "launch"}, protocol.E_UNKNOWN_OP),
        ({"op": "hello"}, protocol.E_BAD_FRAME),
        ({"op": "hello", "v": 2}, protocol.E_VERSION),
        ({"op": "saved"}, protocol.E_BAD_FRAME),
        ({"op": "saved", "path": "x", "step": "7"}, protocol.E_BAD_FRAME),
        ({"op": "saved", "path": "x", "step": True}, protocol.E_BAD_FRAME),
        ({"op": "writing"}, protocol.E_BAD_FRAME),
        ({"op": "writing", "path": "x", "temp": 3}, protocol.E_BAD_FRAME),
        ({"op": "writing", "path": "x", "final": "yes"}, protocol.E_BAD_FRAME),
        ({"op": "writing", "path": "x", "dir": 1}, protocol.E_BAD_FRAME),
        ({"op": "writing", "path": "x", "shared": "no"}, protocol.E_BAD_FRAME),
    ],
)
def test_client_frames_are_validated(frame, code):
    """Unknown ops, missing fields, wrong types (a bool is not a step) and other versions are refused."""
    with pytest.raises(ProtocolError) as err:
        protocol.validate_client_frame(frame)
    assert err.value.code == code


def test_encode_refuses_what_a_peer_would_refuse():
    """A frame without op, or over 64 KiB, is never sent."""
    with pytest.raises(ProtocolError):
        protocol.encode({"path": "x"})
    with pytest.raises(ProtocolError):
        protocol.encode({"op": "saved", "path": "x" * protocol.MAX_LINE})


def test_a_checkpoint_request_adds_its_upload_estimate_after_the_old_fields():
    """With an upload estimate the checkpoint frame carries estimate_seconds and fits after the four old
    fields (an old trainer ignores keys it does not know), and a client parses them as optional."""
    from datetime import UTC, datetime

    from spotd.client.request import CheckpointRequest

    deadline = datetime(2026, 11, 25, 4, 1, 50, tzinfo=UTC)
    frame = protocol.checkpoint(
        request_id="r1",
        reason="spot-terminate",
        deadline=deadline,
        final=True,
        estimate_seconds=12.5,
        fits=False,
    )
    assert list(frame) == ["op", "request_id", "reason", "deadline", "final", "estimate_seconds", "fits"]
    assert protocol.decode(protocol.encode(frame)) == frame
    request = CheckpointRequest.from_frame(frame)
    assert (request.estimate_seconds, request.fits) == (12.5, False)
    old = CheckpointRequest.from_frame(
        protocol.checkpoint(request_id="r2", reason="drill", deadline=deadline, final=False)
    )
    assert (old.estimate_seconds, old.fits) == (None, None)
    odd = CheckpointRequest.from_frame({**frame, "estimate_seconds": "soon", "fits": "maybe"})
    assert (odd.estimate_seconds, odd.fits) == (None, None)


def test_daemon_frame_builders_write_the_bytes_of_before():
    """Each builder encodes to the same bytes as the literal dict the daemon sent before it existed (keys, order, values)."""
    from datetime import UTC, datetime

    deadline = datetime(2026, 11, 25, 4, 1, 50, 123456, tzinfo=UTC)
    extra = {"checkpoint_dir": "/ckpt", "job_id": "j", "instance_id": "i-1", "phase": "Training"}
    pairs = [
        (
            protocol.welcome(session="abc", extra=extra),
            {"op": "welcome", "v": protocol.PROTOCOL_VERSION, "session": "abc", **extra},
        ),
        (
            protocol.checkpoint(request_id="r1", reason="spot-terminate", deadline=deadline, final=True),
            {
                "op": "checkpoint",
                "request_id": "r1",
                "reason": "spot-terminate",
                "deadline": "2026-11-25T04:01:50.123Z",
                "final": True,
            },
        ),
        (
            protocol.durable(request_id=None, path="a/b.pt", step=7, name="n", uri="s3://b/p"),
            {
                "op": "durable",
                "request_id": None,
                "path": "a/b.pt",
                "step": 7,
                "name": "n",
                "uri": "s3://b/p",
            },
        ),
        (
            protocol.store_failed(request_id="r1", path="a/b.pt", message="upload failed"),
            {
                "op": "error",
                "code": protocol.E_STORE,
                "request_id": "r1",
                "path": "a/b.pt",
                "message": "upload failed",
            },
        ),
        (
            protocol.error(code=protocol.E_PATH, message="no", request_id=None, path="../x"),
            {"op": "error", "code": protocol.E_PATH, "message": "no", "request_id": None, "path": "../x"},
        ),
        (protocol.error(code="busy", message="full"), {"op": "error", "code": "busy", "message": "full"}),
        (protocol.reply("status", {"phase": "Training"}), {"op": "status", "phase": "Training"}),
        (protocol.reply("drill", {"ok": True}), {"op": "drill", "ok": True}),
    ]
    for built, literal in pairs:
        assert protocol.encode(built) == protocol.encode(literal)


def test_ops_come_from_daemon_ops_and_client_ops():
    """A reply is only to a request both sides know; the validator accepts exactly CLIENT_OPS."""
    for op in ("saved", "hello", "checkpoint"):
        with pytest.raises(ValueError, match=op):
            protocol.reply(op, {})
    assert set(protocol._FIELDS) == protocol.CLIENT_OPS
    assert {"welcome", "checkpoint", "durable", "error"} <= protocol.DAEMON_OPS


def test_client_frame_builders_write_the_bytes_of_before():
    """Each client → daemon builder encodes to the bytes spotd.client sent as a literal dict before it existed: a trainer's and a control client's hello, saved with and without final, failed, status, finished, drill."""
    pairs = [
        (
            protocol.hello(name="train", pid=42, rank=1, world_size=4, role="trainer"),
            {
                "op": "hello",
                "v": 1,
                "name": "train",
                "pid": 42,
                "rank": 1,
                "world_size": 4,
                "role": "trainer",
            },
        ),
        (
            protocol.hello(name="train", pid=42, rank=None, world_size=None, role="trainer"),
            {
                "op": "hello",
                "v": 1,
                "name": "train",
                "pid": 42,
                "rank": None,
                "world_size": None,
                "role": "trainer",
            },
        ),
        (
            protocol.hello(
                name="r0",
                pid=42,
                rank=0,
                world_size=4,
                role="trainer",
                placement={"local_rank": 0, "local_world_size": 2, "node_rank": None, "run_id": "run-1"},
            ),
            {
                "op": "hello",
                "v": 1,
                "name": "r0",
                "pid": 42,
                "rank": 0,
                "world_size": 4,
                "role": "trainer",
                "local_rank": 0,
                "local_world_size": 2,
                "run_id": "run-1",
            },
        ),
        (
            protocol.hello(name="spotd-cli", pid=42, role="control"),
            {"op": "hello", "v": 1, "name": "spotd-cli", "pid": 42, "role": "control"},
        ),
        (
            protocol.saved(request_id="r1", path="a.pt", step=3),
            {"op": "saved", "request_id": "r1", "path": "a.pt", "step": 3},
        ),
        (
            protocol.saved(request_id=None, path="a.pt", step=None, final=True, reason="sigterm"),
            {
                "op": "saved",
                "request_id": None,
                "path": "a.pt",
                "step": None,
                "final": True,
                "reason": "sigterm",
            },
        ),
        (
            protocol.saved(request_id=None, path="a.pt", step=9, final=True, reason="peer"),
            {"op": "saved", "request_id": None, "path": "a.pt", "step": 9, "final": True, "reason": "peer"},
        ),
        (
            protocol.saved(request_id="r2", path="dcp/", step=9, shared=True),
            {"op": "saved", "request_id": "r2", "path": "dcp/", "step": 9, "shared": True},
        ),
        (
            protocol.saved(request_id=None, path="dcp/", step=9, final=True, reason="peer", shared=True),
            {
                "op": "saved",
                "request_id": None,
                "path": "dcp/",
                "step": 9,
                "final": True,
                "reason": "peer",
                "shared": True,
            },
        ),
        (
            protocol.failed(request_id=None, message="disk full"),
            {"op": "failed", "request_id": None, "message": "disk full"},
        ),
        (protocol.status(), {"op": "status"}),
        (protocol.finished(step=1200), {"op": "finished", "step": 1200}),
        (
            protocol.finished(reason="complete", checkpoint=True),
            {"op": "finished", "reason": "complete", "checkpoint": True},
        ),
        (protocol.drill(reason="drill", wait=True), {"op": "drill", "reason": "drill", "wait": True}),
        (protocol.drill(reason="test"), {"op": "drill", "reason": "test"}),
    ]
    for built, literal in pairs:
        assert protocol.encode(built) == protocol.encode(literal)
        assert protocol.validate_client_frame(built) is built


def test_writing_announces_the_path_then_the_temp_name_and_only_what_is_given():
    """``writing`` (new, optional) carries path and step, then temp, final, dir and shared only when given; it
    validates."""
    cases = [
        (protocol.writing(path="a/s.pt", step=5), b'{"op":"writing","path":"a/s.pt","step":5}\n'),
        (
            protocol.writing(path="a/s.pt", step=None, temp="a/.s.pt.tmp-9", final=True),
            b'{"op":"writing","path":"a/s.pt","step":null,"temp":"a/.s.pt.tmp-9","final":true}\n',
        ),
        (
            protocol.writing(path="a/step-5.dcp", step=5, dir=True, shared=True),
            b'{"op":"writing","path":"a/step-5.dcp","step":5,"dir":true,"shared":true}\n',
        ),
    ]
    for built, wire in cases:
        assert protocol.encode(built) == wire
        assert protocol.validate_client_frame(built) is built


def test_frames_are_built_by_the_builders_only():
    """No module but protocol.py writes a frame as a literal dict, so each frame's keys are written once."""
    import re
    from pathlib import Path

    root = Path(protocol.__file__).parent
    # As the formatter writes a dict: a compact '{"op":"hello"}' inside a message string is text, not a frame.
    literal = re.compile(r"""\{\s*["']op["']: """)
    offenders = [
        f"{path.relative_to(root.parent)}:{n}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "protocol.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert offenders == []
