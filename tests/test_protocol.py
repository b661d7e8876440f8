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
