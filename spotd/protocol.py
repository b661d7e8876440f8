"""The socket wire format: one JSON object per line (NDJSON), UTF-8, at most 64 KiB a line.

Stdlib only: :mod:`spotd.client` imports this and must stay light.

Daemon → trainer: ``welcome``, ``checkpoint``, ``durable``, ``error`` (and ``status`` replies).
Trainer → daemon: ``hello``, ``saved``, ``failed``, ``status``.
A control client (``spotd status``/``spotd checkpoint``) says ``hello`` with ``"role": "control"`` and may
then send ``status`` or ``drill``; it is never counted as a trainer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

from spotd.errors import ProtocolError

__all__ = [
    "DEFAULT_SOCKET",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "decode",
    "encode",
    "socket_path",
    "validate_client_frame",
]

PROTOCOL_VERSION: Final = 1
#: Bytes in one frame including the newline.
MAX_LINE: Final = 64 * 1024
#: Where the daemon listens unless ``socket.path`` says otherwise (systemd's RuntimeDirectory=spotd).
DEFAULT_SOCKET: Final = "/run/spotd/spotd.sock"

CLIENT_OPS: Final = frozenset({"hello", "saved", "failed", "status", "drill"})
DAEMON_OPS: Final = frozenset({"welcome", "checkpoint", "durable", "error", "status", "drill"})

# Error codes sent in `error` frames.
E_BAD_JSON: Final = "bad_json"
E_TOO_LONG: Final = "too_long"
E_BAD_FRAME: Final = "bad_frame"
E_UNKNOWN_OP: Final = "unknown_op"
E_NO_HELLO: Final = "hello_required"
E_VERSION: Final = "unsupported_version"
E_PATH: Final = "path_refused"
E_STORE: Final = "store_failed"
E_FORBIDDEN: Final = "forbidden"


def socket_path(explicit: str | None = None) -> str:
    """The socket a training process talks to: ``explicit``, else ``$SPOTD_SOCKET``, else the default."""
    return explicit or os.environ.get("SPOTD_SOCKET") or DEFAULT_SOCKET


def encode(message: dict[str, Any]) -> bytes:
    """One frame: compact JSON and a newline. Raises ProtocolError if it would be too long."""
    if "op" not in message:
        raise ProtocolError(E_BAD_FRAME, "every message needs an 'op'")
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(E_TOO_LONG, f"frame of {len(data)} bytes exceeds {MAX_LINE}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (with or without its newline) into a message with an ``op``."""
    if len(line) > MAX_LINE:
        raise ProtocolError(E_TOO_LONG, f"frame of {len(line)} bytes exceeds {MAX_LINE}; send smaller frames")
    try:
        message = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(E_BAD_JSON, f"frame is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ProtocolError(E_BAD_JSON, f"frame is not JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(E_BAD_FRAME, "frame must be a JSON object")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError(E_BAD_FRAME, "frame must have a string 'op'")
    return message


_FIELDS: Final[dict[str, dict[str, tuple[type | tuple[type, ...], bool]]]] = {
    # op: {field: (types, required)}
    "hello": {
        "v": (int, True),
        "name": (str, False),
        "pid": (int, False),
        "rank": ((int, type(None)), False),
        "world_size": ((int, type(None)), False),
        "role": (str, False),
    },
    "saved": {
        "request_id": ((str, type(None)), False),
        "path": (str, True),
        "step": ((int, type(None)), False),
        # A save the daemon did not ask for that must still go out at once (the trainer got SIGTERM).
        "final": (bool, False),
        "reason": (str, False),
    },
    "failed": {"request_id": ((str, type(None)), False), "message": (str, False)},
    "status": {},
    "drill": {"reason": (str, False), "wait": (bool, False)},
}


def validate_client_frame(message: dict[str, Any]) -> dict[str, Any]:
    """Check a trainer → daemon frame's op and field types; returns it unchanged."""
    op = message["op"]
    fields = _FIELDS.get(op)
    if fields is None:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown op {op!r}; expected one of {sorted(_FIELDS)}")
    for name, (types, required) in fields.items():
        if name not in message:
            if required:
                raise ProtocolError(E_BAD_FRAME, f"{op!r} frame needs field {name!r}")
            continue
        value = message[name]
        # bool is an int in Python; a step of `true` is still wrong.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ProtocolError(E_BAD_FRAME, f"{op!r} field {name!r} has the wrong type")
        if not isinstance(value, types):
            raise ProtocolError(E_BAD_FRAME, f"{op!r} field {name!r} has the wrong type")
    if op == "hello" and message["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            E_VERSION,
            f"protocol version {message['v']} is not supported; this daemon speaks v{PROTOCOL_VERSION}",
        )
    return message
