"""sd_notify(3) without libsystemd: READY, STATUS, STOPPING, WATCHDOG and timeout extensions.

systemd hands a ``Type=notify`` service a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract
name starting with ``@``). Outside systemd the variable is unset and every call is a cheap no-op, so the
daemon calls these unconditionally. A notification that cannot be sent is logged at debug and reported
as ``False``: telling systemd about progress must never take the daemon down.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

from spotd.logs import get_logger

__all__ = ["Notifier", "watchdog_loop"]

log = get_logger("spotd.systemd")


class Notifier:
    """Sends sd_notify messages to the socket systemd gave us.

    ``Notifier(socket_path="")`` is a disabled notifier: every call returns False.
    """

    __slots__ = ("_address", "_environ", "_socket_path")

    def __init__(self, *, socket_path: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        path = socket_path if socket_path is not None else self._environ.get("NOTIFY_SOCKET", "")
        self._socket_path = path
        self._address = _address(path)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def socket_path(self) -> str:
        return self._socket_path

    def notify(self, **fields: str | int) -> bool:
        """``notify(READY=1, STATUS="restored")`` sends ``b"READY=1\\nSTATUS=restored"``; True if sent."""
        if self._address is None or not fields:
            return False
        # A newline inside a value would start a new assignment that systemd then acts on.
        payload = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop: a full receive queue means systemd is not reading anyway.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug(
                "systemd.notify_failed", socket=self._socket_path, fields=sorted(fields), error=str(exc)
            )
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, STATUS=status) if status else self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start or stop timeout fires (restore of a large checkpoint,
        the last-chance upload on SIGTERM); systemd ignores it outside those phases."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(1, int(seconds * 1_000_000)))

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``$WATCHDOG_USEC``, or None when no watchdog is asked of us.

        ``$WATCHDOG_PID`` names the process the watchdog is meant for; a child that inherited the
        environment must not ping on its parent's behalf.
        """
        raw = self._environ.get("WATCHDOG_USEC", "")
        pid = self._environ.get("WATCHDOG_PID", "")
        if not raw:
            return None
        if pid and pid != str(os.getpid()):
            return None
        try:
            usec = int(raw)
        except ValueError:
            log.debug("systemd.watchdog_usec_invalid", value=raw)
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000


def _address(path: str) -> str | bytes | None:
    if not path:
        return None
    if path.startswith("@"):
        # Abstract namespace: a leading NUL instead of '@', no filesystem entry.
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        # sd_notify(3) accepts only absolute paths and '@' names; anything else is a misconfiguration.
        log.debug("systemd.notify_socket_invalid", socket=path)
        return None
    return path


async def watchdog_loop(notifier: Notifier, *, interval_s: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` until cancelled.

    It runs as a task on the daemon's own loop on purpose: if the loop hangs, the pings stop and systemd
    restarts the service after ``WatchdogSec``.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}; pass Notifier.watchdog_interval()")
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)
