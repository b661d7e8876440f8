"""The socket wire format: one JSON object per line (NDJSON), UTF-8, at most 64 KiB a line.

Stdlib only: :mod:`spotd.client` imports this and must stay light.

Daemon → trainer: ``welcome``, ``checkpoint``, ``durable``, ``error`` (and ``status`` replies).
Trainer → daemon: ``hello``, ``writing`` (optional: a save is about to be written at ``path``; the daemon may
start uploading its parts while it grows, or for a directory each file as it is closed, and commits nothing
before ``saved``), ``saved``, ``failed``,
``status``, ``finished`` (the job is done: spotd marks it Completed and answers ``finished`` with the
outcome).
A control client (``spotd status``/``spotd checkpoint``/``spotd complete``) says ``hello`` with
``"role": "control"`` and may then send ``status``, ``drill`` or ``finished``; it never counts as a trainer.

Both sides build their frames with the functions below rather than literal dicts, so each frame's keys are
written once; the key order of each is kept as it always was, so the bytes on the wire do not change.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from spotd.errors import ProtocolError
from spotd.events import format_time

__all__ = [
    "CLIENT_OPS",
    "DAEMON_OPS",
    "DEFAULT_SOCKET",
    "MAX_LINE",
    "OMIT",
    "PLACEMENT",
    "PROTOCOL_VERSION",
    "checkpoint",
    "decode",
    "drill",
    "durable",
    "encode",
    "error",
    "failed",
    "finished",
    "hello",
    "reply",
    "saved",
    "socket_path",
    "status",
    "store_failed",
    "validate_client_frame",
    "welcome",
    "writing",
]

PROTOCOL_VERSION: Final = 1
#: Bytes in one frame including the newline.
MAX_LINE: Final = 64 * 1024
#: Where the daemon listens unless ``socket.path`` says otherwise (systemd's RuntimeDirectory=spotd).
DEFAULT_SOCKET: Final = "/run/spotd/spotd.sock"

CLIENT_OPS: Final = frozenset({"hello", "writing", "saved", "failed", "status", "drill", "finished"})
DAEMON_OPS: Final = frozenset({"welcome", "checkpoint", "durable", "error", "status", "drill", "finished"})

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
        # torchrun's placement and the run's identity (the same on every rank of one run).
        "local_rank": ((int, type(None)), False),
        "local_world_size": ((int, type(None)), False),
        "node_rank": ((int, type(None)), False),
        "run_id": ((str, type(None)), False),
    },
    # A file about to be written: ``path`` as ``saved`` will report it; ``temp``, when the bytes go to another
    # name first (write to a temp file, then rename), the name they are written under (the daemon follows
    # that file through the rename); ``final`` as in ``saved``. ``dir``: ``path`` (and ``temp``) is a
    # directory about to be filled (the daemon uploads each file as it is closed; only to a daemon whose
    # welcome says ``"writing_dirs": true``); ``shared`` as in ``saved``.
    "writing": {
        "path": (str, True),
        "step": ((int, type(None)), False),
        "temp": (str, False),
        "final": (bool, False),
        "dir": (bool, False),
        "shared": (bool, False),
    },
    "saved": {
        "request_id": ((str, type(None)), False),
        "path": (str, True),
        "step": ((int, type(None)), False),
        # A save the daemon did not ask for that must still go out at once (the trainer got SIGTERM).
        "final": (bool, False),
        "reason": (str, False),
        # The path holds every rank's part (a torch.distributed.checkpoint directory), not one rank's.
        "shared": (bool, False),
    },
    "failed": {"request_id": ((str, type(None)), False), "message": (str, False)},
    "status": {},
    "drill": {"reason": (str, False), "wait": (bool, False)},
    # The job is done. ``step``: the steps done, whose checkpoint the trainer has made durable (the daemon
    # refuses to mark the job Completed while the newest durable one is older). ``checkpoint``: ask every
    # trainer for a final checkpoint first (``spotd complete``, for scripts that report no saves themselves).
    "finished": {"step": ((int, type(None)), False), "reason": (str, False), "checkpoint": (bool, False)},
}


def validate_client_frame(message: dict[str, Any]) -> dict[str, Any]:
    """Check a trainer → daemon frame's op and field types; returns it unchanged."""
    op = message["op"]
    if op not in CLIENT_OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown op {op!r}; expected one of {sorted(CLIENT_OPS)}")
    fields = _FIELDS[op]
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


# ------------------------------------------------------------------------------ daemon → client frames


class _Omit(enum.Enum):
    """A field left out of a frame, as opposed to one sent as ``null``."""

    OMIT = enum.auto()


OMIT: Final = _Omit.OMIT


def _daemon_frame(op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    if op not in DAEMON_OPS:
        # A bug in the daemon, not the peer: no client would understand the frame.
        raise ValueError(f"{op!r} is not a daemon → client op; add it to DAEMON_OPS or use one of them")
    return {"op": op, **fields}


def welcome(*, session: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to ``hello``: the session id, then what the handler tells every client (checkpoint_dir…)."""
    return _daemon_frame("welcome", {"v": PROTOCOL_VERSION, "session": session, **extra})


def checkpoint(
    *,
    request_id: str,
    reason: str,
    deadline: datetime,
    final: bool,
    estimate_seconds: float | _Omit = OMIT,
    fits: bool | _Omit = OMIT,
) -> dict[str, Any]:
    """Ask a trainer to save now; ``final`` says the instance is going away after ``deadline``.

    ``estimate_seconds`` and ``fits``, sent only when the daemon has measured its upload rate: how long the
    upload of a save the size of the last one should take, and whether it should be durable by
    ``deadline`` (a trainer may then save less, if its user said what may be left out)."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "reason": reason,
        "deadline": format_time(deadline),
        "final": final,
    }
    if estimate_seconds is not OMIT:
        fields["estimate_seconds"] = estimate_seconds
    if fits is not OMIT:
        fields["fits"] = fits
    return _daemon_frame("checkpoint", fields)


def durable(*, request_id: str | None, path: str, step: int | None, name: str, uri: str) -> dict[str, Any]:
    """The save at ``path`` is committed in the store as ``name`` (under ``uri``)."""
    return _daemon_frame(
        "durable", {"request_id": request_id, "path": path, "step": step, "name": name, "uri": uri}
    )


def error(
    *,
    code: str,
    message: str,
    request_id: str | _Omit | None = OMIT,
    path: str | _Omit | None = OMIT,
) -> dict[str, Any]:
    """A refusal or failure; ``request_id`` and ``path``, sent only when given, match it to a request."""
    fields: dict[str, Any] = {"code": code, "message": message}
    if request_id is not OMIT:
        fields["request_id"] = request_id
    if path is not OMIT:
        fields["path"] = path
    return _daemon_frame("error", fields)


def store_failed(*, request_id: str | None, path: str, message: str) -> dict[str, Any]:
    """The save at ``path`` could not be committed; the trainer keeps its local copy."""
    return _daemon_frame(
        "error", {"code": E_STORE, "request_id": request_id, "path": path, "message": message}
    )


def reply(op: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to a client's ``status`` or ``drill``: the same op, then the handler's body."""
    if op not in CLIENT_OPS:
        raise ValueError(f"{op!r} is not a request a client sends; only requests get a reply")
    return _daemon_frame(op, body)


# ------------------------------------------------------------------------------ client → daemon frames


def _client_frame(op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    if op not in CLIENT_OPS:
        raise ValueError(f"{op!r} is not a client → daemon op; add it to CLIENT_OPS or use one of them")
    return {"op": op, **fields}


#: What a trainer may add to its hello about where it runs (torchrun's env) and which run it belongs to.
PLACEMENT: Final = ("local_rank", "local_world_size", "node_rank", "run_id")


def hello(
    *,
    name: str,
    pid: int,
    role: str,
    rank: int | _Omit | None = OMIT,
    world_size: int | _Omit | None = OMIT,
    placement: Mapping[str, int | str | None] | None = None,
) -> dict[str, Any]:
    """The first frame of every connection. A trainer sends its rank and world size (null when unknown)
    and, after them, whatever of ``placement`` (:data:`PLACEMENT`) it knows; a value of None is left out.
    A control client (``role="control"``) sends none of these."""
    unknown = set(placement or {}) - set(PLACEMENT)
    if unknown:
        raise ValueError(f"hello has no field {sorted(unknown)}; placement is {', '.join(PLACEMENT)}")
    fields: dict[str, Any] = {"v": PROTOCOL_VERSION, "name": name, "pid": pid}
    if rank is not OMIT:
        fields["rank"] = rank
    if world_size is not OMIT:
        fields["world_size"] = world_size
    fields["role"] = role
    fields.update({k: v for k, v in (placement or {}).items() if v is not None})
    return _client_frame("hello", fields)


def writing(
    *,
    path: str,
    step: int | None,
    temp: str | _Omit = OMIT,
    final: bool | _Omit = OMIT,
    dir: bool | _Omit = OMIT,
    shared: bool | _Omit = OMIT,
) -> dict[str, Any]:
    """A save of ``step`` is about to be written, to be reported as ``path`` (relative to checkpoint_dir);
    its bytes go to ``temp`` first when given. Sent only to a daemon whose welcome says ``"writing": true``
    (``"writing_dirs": true`` for a ``dir``, a directory whose files are about to be written); the
    ``saved`` frame that follows is what commits it."""
    fields: dict[str, Any] = {"path": path, "step": step}
    if temp is not OMIT:
        fields["temp"] = temp
    if final is not OMIT:
        fields["final"] = final
    if dir is not OMIT:
        fields["dir"] = dir
    if shared is not OMIT:
        fields["shared"] = shared
    return _client_frame("writing", fields)


def saved(
    *,
    request_id: str | None,
    path: str,
    step: int | None,
    final: bool | _Omit = OMIT,
    reason: str | _Omit = OMIT,
    shared: bool | _Omit = OMIT,
) -> dict[str, Any]:
    """A checkpoint was written at ``path`` (relative to checkpoint_dir); ``request_id`` null for a save of
    the trainer's own. ``final`` and ``reason``, sent only when given, say the trainer is stopping
    (SIGTERM, or a peer rank was asked); ``shared`` that the path holds every rank's part."""
    fields: dict[str, Any] = {"request_id": request_id, "path": path, "step": step}
    if final is not OMIT:
        fields["final"] = final
    if reason is not OMIT:
        fields["reason"] = reason
    if shared is not OMIT:
        fields["shared"] = shared
    return _client_frame("saved", fields)


def failed(*, request_id: str | None, message: str) -> dict[str, Any]:
    """The requested checkpoint (or, with ``request_id`` null, a save of the trainer's own) failed."""
    return _client_frame("failed", {"request_id": request_id, "message": message})


def status() -> dict[str, Any]:
    """Ask for the daemon's status; the reply is a ``status`` frame."""
    return _client_frame("status", {})


def drill(*, reason: str | _Omit = OMIT, wait: bool | _Omit = OMIT) -> dict[str, Any]:
    """``spotd checkpoint``: ask every trainer now (control clients only); ``wait`` for the outcome."""
    fields: dict[str, Any] = {}
    if reason is not OMIT:
        fields["reason"] = reason
    if wait is not OMIT:
        fields["wait"] = wait
    return _client_frame("drill", fields)


def finished(
    *,
    step: int | _Omit | None = OMIT,
    reason: str | _Omit = OMIT,
    checkpoint: bool | _Omit = OMIT,
) -> dict[str, Any]:
    """The job is done: a trainer's ``finished(step)``, or ``spotd complete`` (``reason``, and whether to
    ask every trainer for a final ``checkpoint`` first); the reply is a ``finished`` frame."""
    fields: dict[str, Any] = {}
    if step is not OMIT:
        fields["step"] = step
    if reason is not OMIT:
        fields["reason"] = reason
    if checkpoint is not OMIT:
        fields["checkpoint"] = checkpoint
    return _client_frame("finished", fields)
