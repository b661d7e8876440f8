"""A control client's one request (``spotd status``, ``spotd checkpoint``). Stdlib only."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

from spotd import protocol
from spotd.client.wire import FIX, open_wire
from spotd.errors import ProtocolError

__all__ = ["control"]

#: What a control client may ask, and the builder of each request.
_REQUESTS: Final[dict[str, Callable[..., dict[str, Any]]]] = {
    "status": protocol.status,
    "drill": protocol.drill,
    "finished": protocol.finished,
}


def control(
    op: str, *, socket_path: str | None = None, timeout: float = 10.0, **fields: Any
) -> dict[str, Any]:
    """One request as a control client (``spotd status``, ``spotd checkpoint``); returns the reply.

    Raises ConnectionError naming the socket and the fix when nobody answers, TimeoutError when the daemon
    is too slow, and ProtocolError (with its ``code``) when the daemon answers with an error or ``op`` is
    not a control request (``unknown_op``, without connecting).
    """
    build = _REQUESTS.get(op)
    if build is None:
        raise ProtocolError(
            protocol.E_UNKNOWN_OP, f"{op!r} is not a control request; use one of {sorted(_REQUESTS)}"
        )
    request = build(**fields)
    path = protocol.socket_path(socket_path)
    deadline = time.monotonic() + timeout
    hello = protocol.hello(name="spotd-cli", pid=os.getpid(), role="control")
    try:
        wire, _ = open_wire(path, hello, deadline)
    except PermissionError as exc:
        raise ConnectionError(
            f"no permission to use the spotd socket {path}: add your user to the socket's group "
            "(socket.group) or run as root"
        ) from exc
    except TimeoutError as exc:
        raise TimeoutError(f"spotd at {path} did not answer within {timeout}s; {FIX}") from exc
    except OSError as exc:
        raise ConnectionError(f"cannot reach spotd at {path} ({exc.strerror or exc}); {FIX}") from exc
    try:
        wire.sock.sendall(protocol.encode(request))
        while True:
            frame = wire.read_frame(deadline)
            assert frame is not None
            if frame["op"] == "error":
                raise ProtocolError(str(frame.get("code", "error")), str(frame.get("message", "")))
            if frame["op"] == op:
                return frame
    except TimeoutError as exc:
        raise TimeoutError(f"spotd at {path} did not answer {op!r} within {timeout}s") from exc
    finally:
        wire.close()
