"""One connection to the daemon: connect, say hello, read frames under a deadline. Stdlib only."""

from __future__ import annotations

import socket
import time
from typing import Any, Final

from spotd import protocol
from spotd.errors import ProtocolError

__all__ = ["FIX", "Wire", "open_wire"]

#: What to tell a person whose trainer cannot reach the daemon.
FIX: Final = "is spotd running? systemctl status spotd; or set SPOTD_SOCKET to its socket path"


class Wire:
    """A connected socket and the bytes read past the last frame."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def read_frame(self, deadline: float | None) -> dict[str, Any] | None:
        """The next frame. With a deadline: TimeoutError when it passes. Without: None after one poll."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return protocol.decode(line)
            if len(self.buf) >= protocol.MAX_LINE:
                raise ProtocolError(protocol.E_TOO_LONG, f"spotd sent a frame over {protocol.MAX_LINE} bytes")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("spotd did not answer in time")
                self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if deadline is None:
                    return None
                raise
            if not data:
                raise ConnectionResetError("spotd closed the connection")
            self.buf += data

    def shutdown(self) -> None:
        """Wake a blocked reader without closing the fd under it (only the reader closes)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def open_wire(path: str, hello: dict[str, Any], deadline: float) -> tuple[Wire, dict[str, Any]]:
    """Connect, say hello, return the wire and the welcome."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(path)
        sock.sendall(protocol.encode(hello))
        wire = Wire(sock)
        frame = wire.read_frame(deadline)
        assert frame is not None
        if frame["op"] == "error":
            raise ProtocolError(
                str(frame.get("code", "error")), f"spotd refused the hello: {frame.get('message', '')}"
            )
        if frame["op"] != "welcome":
            raise ProtocolError(protocol.E_BAD_FRAME, f"spotd answered hello with {frame['op']!r}")
        return wire, frame
    except BaseException:
        sock.close()
        raise
