"""The daemon's socket file: where it lives, whether another spotd owns it, who may use it, and who is on the
other end of a connection.

The server (:mod:`.ipc`) calls, in this order: :meth:`SocketFile.prepare` before binding (its directory,
and a stale socket of a dead spotd removed, a live one refused), :meth:`SocketFile.secure` right after (mode
and group, independent of the umask), and :meth:`SocketFile.remove` when it closes (only its own socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final

from spotd.errors import ConfigError, DaemonAlreadyRunning
from spotd.logs import get_logger

__all__ = ["SocketFile", "peer_credentials"]

log = get_logger("spotd.ipc")

#: How long a probe waits on an existing socket before calling its owner alive but hung.
_PROBE_TIMEOUT_S: Final = 1.0
_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class SocketFile:
    """One socket path: ``prepare()``, bind, ``secure()``; ``remove()`` at the end."""

    __slots__ = ("_gid", "_group", "_inode", "_mode", "path")

    def __init__(self, *, path: str, group: str = "", mode: int = 0o660) -> None:
        self.path = path
        self._group = group
        self._mode = mode
        self._gid: int | None = None
        self._inode: int | None = None

    @property
    def mode(self) -> int:
        return self._mode

    async def prepare(self) -> None:
        """Make ready to bind: the group exists, the directory exists, no other spotd owns the path.

        Raises ConfigError (unknown group, a non-socket in the way, a path we may not check) or
        DaemonAlreadyRunning, each with the fix in the message.
        """
        self._gid = _resolve_group(self._group)
        path = Path(self.path)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o755)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                "socket.path",
                f"{path} exists and is not a socket",
                "spotd never deletes it: move it away, or set socket.path to another path",
            )
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                _, writer = await asyncio.open_unix_connection(str(path))
        except ConnectionRefusedError:
            # Nobody listens: a previous spotd died without cleaning up.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("socket.stale_removed", path=str(path))
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            raise DaemonAlreadyRunning(
                f"something holds {path} but does not accept connections (a hung spotd?); stop it first "
                "(systemctl stop spotd) or set socket.path to another path"
            ) from None
        except OSError as exc:
            raise ConfigError(
                "socket.path",
                f"cannot check whether another spotd owns {path}: {exc.strerror or exc}",
                "run spotd as root, or set socket.path to a path this user owns",
            ) from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise DaemonAlreadyRunning(
            f"another spotd is already listening on {path}; stop it first (systemctl stop spotd) "
            "or give this one another socket.path"
        )

    def secure(self) -> None:
        """Give the bound socket its mode and group; remembers it as ours. On failure the file is removed
        and ConfigError says which setting to change."""
        try:
            # chmod after bind: the mode must not depend on the daemon's umask.
            os.chmod(self.path, self._mode)
            # The socket is born with the daemon's group (Group=spotd in spotd.service): then there is
            # nothing to change, and chown must not even be tried, since the unit's
            # SystemCallFilter=~@privileged answers it with EPERM.
            if self._gid is not None and os.stat(self.path).st_gid != self._gid:
                os.chown(self.path, -1, self._gid)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise ConfigError(
                "socket.group",
                f"cannot give {self.path} mode {self._mode:o} group {self._group!r}: {exc.strerror or exc}",
                f"set socket.group to the daemon's own group ({_group_name(os.getegid())}, Group= in "
                'spotd.service) or to "", and add the trainers to that group: spotd.service forbids '
                "chown (SystemCallFilter=~@privileged); outside systemd, run spotd as a member of "
                f"{self._group!r}",
            ) from exc
        self._inode = os.stat(self.path).st_ino

    def remove(self) -> None:
        """Unlink the socket if it is still ours: a newer spotd may already have replaced it."""
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None, int | None]:
    """(pid, uid, gid) of the peer as the kernel says (SO_PEERCRED), not as the client claims."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except (OSError, AttributeError, struct.error):
        return None, None, None  # not Linux, or the peer is already gone
    return pid, uid, gid


def _resolve_group(group: str) -> int | None:
    if not group:
        return None
    try:
        if group.isdigit():
            return grp.getgrgid(int(group)).gr_gid
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            "socket.group",
            f"group {group!r} does not exist",
            "create it (groupadd spotd) and add the training user, or set socket.group to an existing group "
            'or "" to keep the daemon\'s own group',
        ) from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
