"""The daemon's Unix socket: trainers and control clients speak NDJSON (:mod:`spotd.protocol`) to it.

One task per connection reads frames in order and awaits the :class:`Handler`; connections never wait on
each other. Every write is bounded by ``write_timeout_s``: a peer that stops reading is dropped rather
than allowed to stall a broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from spotd import protocol
from spotd.errors import ConfigError, DaemonAlreadyRunning, ProtocolError
from spotd.logs import get_logger
from spotd.metrics import Metrics

__all__ = ["E_BUSY", "E_INTERNAL", "Handler", "IpcServer", "Session"]

log = get_logger("spotd.ipc")

#: Error codes this module adds to protocol.py's.
E_INTERNAL: Final = "internal"
E_BUSY: Final = "busy"
ROLES: Final = frozenset({"trainer", "control"})
#: How long a probe waits on an existing socket before calling its owner alive but hung.
_PROBE_TIMEOUT_S: Final = 1.0
_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


@dataclass(slots=True)
class Session:
    """One connection that completed the hello handshake."""

    id: str
    role: str  # "trainer" | "control"
    name: str
    pid: int | None
    rank: int | None
    world_size: int | None
    peer_pid: int | None  # SO_PEERCRED: what the kernel says, not what the client claims
    peer_uid: int | None
    peer_gid: int | None
    connected_at: float  # wall time


class Handler(Protocol):
    """What the daemon does with frames; the coordinator implements it."""

    def welcome(self, session: Session) -> dict[str, Any]: ...
    async def on_ready(self, session: Session) -> None: ...
    async def on_saved(self, session: Session, frame: dict[str, Any]) -> None: ...
    async def on_failed(self, session: Session, frame: dict[str, Any]) -> None: ...
    async def on_status(self, session: Session) -> dict[str, Any]: ...
    async def on_drill(self, session: Session, frame: dict[str, Any]) -> dict[str, Any]: ...
    async def on_finished(self, session: Session, frame: dict[str, Any]) -> dict[str, Any]: ...
    def on_disconnect(self, session: Session) -> None: ...


class _Conn:
    """Per-connection state the Session value does not carry."""

    __slots__ = ("closed", "session", "write_lock", "writer")

    def __init__(self, *, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        # Frames from the connection's own task and from broadcasts share one writer; the lock keeps one
        # drain in flight so a timeout drops the connection exactly once.
        self.write_lock = asyncio.Lock()
        self.session: Session | None = None
        self.closed = False


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


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None, int | None]:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except (OSError, AttributeError, struct.error):
        return None, None, None  # not Linux, or the peer is already gone
    return pid, uid, gid


class IpcServer:
    """The Unix socket server. ``start()``, then ``send``/``broadcast``; ``close()`` when done."""

    __slots__ = (
        "_conns",
        "_gid",
        "_group",
        "_handler",
        "_hello_timeout_s",
        "_inode",
        "_max_connections",
        "_metrics",
        "_mode",
        "_path",
        "_server",
        "_tasks",
        "_write_timeout_s",
    )

    def __init__(
        self,
        *,
        path: str,
        handler: Handler,
        metrics: Metrics | None = None,
        group: str = "",
        mode: int = 0o660,
        hello_timeout_s: float = 10.0,
        write_timeout_s: float = 5.0,
        max_connections: int = 1024,
    ) -> None:
        self._path = path
        self._handler = handler
        self._metrics = metrics
        self._group = group
        self._gid: int | None = None
        self._mode = mode
        self._hello_timeout_s = hello_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        # Every connection task, handshake done or not, with its writer, so close() can reach them all.
        self._tasks: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # Handshake done, welcome written: these receive send()/broadcast().
        self._conns: dict[str, _Conn] = {}

    @property
    def path(self) -> str:
        return self._path

    @property
    def trainers(self) -> list[Session]:
        return [s for s in self.sessions if s.role == "trainer"]

    @property
    def sessions(self) -> list[Session]:
        """Every session that completed the handshake, control clients included."""
        return [c.session for c in self._conns.values() if c.session is not None]

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the socket; raises DaemonAlreadyRunning or ConfigError with the fix in the message."""
        self._gid = _resolve_group(self._group)
        await self._prepare_path()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect,
                path=self._path,
                limit=protocol.MAX_LINE,
                # A burst of trainers connecting at once must not hit a full backlog.
                backlog=max(128, min(self._max_connections, 4096)),
            )
        except OSError as exc:
            raise ConfigError(
                "socket.path",
                f"cannot listen on {self._path}: {exc.strerror or exc}",
                "run spotd as root (the systemd unit does) or point socket.path at a writable directory",
            ) from exc
        try:
            # chmod after bind: the mode must not depend on the daemon's umask.
            os.chmod(self._path, self._mode)
            # The socket is born with the daemon's group (Group=spotd in spotd.service): then there is
            # nothing to change, and chown must not even be tried, since the unit's
            # SystemCallFilter=~@privileged answers it with EPERM.
            if self._gid is not None and os.stat(self._path).st_gid != self._gid:
                os.chown(self._path, -1, self._gid)
        except OSError as exc:
            await self._stop_listener()
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            raise ConfigError(
                "socket.group",
                f"cannot give {self._path} mode {self._mode:o} group {self._group!r}: {exc.strerror or exc}",
                f"set socket.group to the daemon's own group ({_group_name(os.getegid())}, Group= in "
                'spotd.service) or to "", and add the trainers to that group: spotd.service forbids '
                "chown (SystemCallFilter=~@privileged); outside systemd, run spotd as a member of "
                f"{self._group!r}",
            ) from exc
        self._inode = os.stat(self._path).st_ino
        self._set_gauge()
        log.info("socket.listening", path=self._path, mode=f"{self._mode:o}", group=self._group or None)

    async def _prepare_path(self) -> None:
        path = Path(self._path)
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

    async def _stop_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def close(self, *, grace_s: float = 1.0) -> None:
        """Stop accepting, close every connection (cancel handlers after ``grace_s``), unlink the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._tasks.values()):
            writer.close()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
                # abort() so a peer that never reads cannot keep a transport (and its fd) alive.
                pending_writer = self._tasks.get(task)
                if pending_writer is not None:
                    pending_writer.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=grace_s)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._remove_socket_file()
        self._set_gauge()
        log.info("socket.closed", path=self._path)

    def _remove_socket_file(self) -> None:
        if self._inode is None:
            return
        try:
            # Only our own socket: a newer spotd may already have replaced it.
            if os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        except FileNotFoundError:
            pass
        self._inode = None

    # -- sending -----------------------------------------------------------------------------------

    async def send(self, session: Session, message: dict[str, Any]) -> bool:
        """Write one frame; False if the session is gone or too slow (it is then dropped)."""
        conn = self._conns.get(session.id)
        if conn is None:
            return False
        return await self._write(conn, protocol.encode(message))

    async def broadcast(self, message: dict[str, Any]) -> int:
        """Send to every trainer concurrently; returns how many got it. A slow trainer delays no other."""
        data = protocol.encode(message)
        conns = [c for c in self._conns.values() if c.session is not None and c.session.role == "trainer"]
        results = await asyncio.gather(*(self._write(c, data) for c in conns))
        return sum(results)

    async def _write(self, conn: _Conn, data: bytes) -> bool:
        if conn.closed:
            return False
        try:
            async with asyncio.timeout(self._write_timeout_s):
                async with conn.write_lock:
                    if conn.closed:
                        return False
                    conn.writer.write(data)
                    await conn.writer.drain()
            return True
        except TimeoutError:
            self._count("write_timeout")
            log.warning("session.write_timeout", seconds=self._write_timeout_s, **self._log_fields(conn))
        except (ConnectionError, OSError) as exc:
            self._count("write_failed")
            log.info("session.write_failed", error=str(exc) or type(exc).__name__, **self._log_fields(conn))
        self._drop(conn)
        return False

    def _drop(self, conn: _Conn) -> None:
        conn.closed = True
        # abort(), not close(): close() would wait for the unread buffer to drain, which is the problem.
        conn.writer.transport.abort()

    # -- connections -------------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        conn = _Conn(writer=writer)
        try:
            if len(self._tasks) > self._max_connections:
                self._count(E_BUSY)
                await self._write_error(
                    conn, E_BUSY, f"spotd already has {self._max_connections} connections; close unused ones"
                )
                return
            await self._serve(conn, reader)
        except ProtocolError as exc:
            # A bad frame on the wire: answer, then close this connection only.
            self._count(exc.code)
            log.warning("socket.bad_frame", code=exc.code, message=str(exc), **self._log_fields(conn))
            await self._write_error(conn, exc.code, str(exc))
        except (ConnectionError, OSError) as exc:
            log.info("session.broken", error=str(exc) or type(exc).__name__, **self._log_fields(conn))
        except Exception:
            log.exception("socket.internal_error", **self._log_fields(conn))
        finally:
            self._tasks.pop(task, None)
            await self._finish(conn)

    async def _finish(self, conn: _Conn) -> None:
        session = conn.session
        if session is not None and self._conns.pop(session.id, None) is not None:
            self._set_gauge()
            try:
                self._handler.on_disconnect(session)
            except Exception:
                log.exception("handler.failed", hook="on_disconnect", session=session.id)
            log.info(
                "session.closed",
                seconds=round(time.time() - session.connected_at, 3),
                **self._log_fields(conn),
            )
        if conn.closed:
            return
        conn.closed = True
        conn.writer.close()
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await conn.writer.wait_closed()
        except (TimeoutError, OSError):
            conn.writer.transport.abort()
        except asyncio.CancelledError:
            conn.writer.transport.abort()
            raise

    async def _read_frame(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The next frame, or None at end of stream."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None  # EOF, possibly mid-frame: the peer went away
        except asyncio.LimitOverrunError:
            # The reader's limit means at most ~2x MAX_LINE is ever buffered, however long the line.
            raise ProtocolError(
                protocol.E_TOO_LONG, f"frame exceeds {protocol.MAX_LINE} bytes; send smaller frames"
            ) from None
        return protocol.decode(line)

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        session = await self._handshake(conn, reader)
        if session is None:
            return
        try:
            await self._handler.on_ready(session)
        except Exception:
            log.exception("handler.failed", hook="on_ready", session=session.id)
        while not conn.closed:
            frame = await self._read_frame(reader)
            if frame is None:
                return
            protocol.validate_client_frame(frame)
            if frame["op"] == "hello":
                raise ProtocolError(protocol.E_BAD_FRAME, "hello was already received on this connection")
            await self._dispatch(conn, session, frame)

    async def _handshake(self, conn: _Conn, reader: asyncio.StreamReader) -> Session | None:
        try:
            async with asyncio.timeout(self._hello_timeout_s):
                frame = await self._read_frame(reader)
        except TimeoutError:
            self._count("hello_timeout")
            log.info("socket.hello_timeout", seconds=self._hello_timeout_s)
            return None
        if frame is None:
            return None  # e.g. another spotd probing whether we are alive
        if frame["op"] != "hello":
            raise ProtocolError(
                protocol.E_NO_HELLO,
                f"the first frame must be hello, got {frame['op']!r}; "
                'send {"op":"hello","v":1,...} first (spotd.client.connect() does)',
            )
        protocol.validate_client_frame(frame)
        role = frame.get("role", "trainer")
        if role not in ROLES:
            raise ProtocolError(protocol.E_BAD_FRAME, f"role {role!r} is not one of {sorted(ROLES)}")
        peer_pid, peer_uid, peer_gid = _peer_credentials(conn.writer)
        session = Session(
            id=uuid.uuid4().hex[:12],
            role=role,
            name=frame.get("name") or "unnamed",
            pid=frame.get("pid"),
            rank=frame.get("rank"),
            world_size=frame.get("world_size"),
            peer_pid=peer_pid,
            peer_uid=peer_uid,
            peer_gid=peer_gid,
            connected_at=time.time(),
        )
        conn.session = session
        try:
            extra = self._handler.welcome(session)
        except Exception:
            log.exception("handler.failed", hook="welcome", session=session.id)
            await self._write_error(
                conn, E_INTERNAL, "spotd failed to welcome this client; see journalctl -u spotd"
            )
            conn.session = None
            return None
        welcome = {"op": "welcome", "v": protocol.PROTOCOL_VERSION, "session": session.id, **extra}
        if not await self._write(conn, protocol.encode(welcome)):
            conn.session = None
            return None
        self._conns[session.id] = conn
        self._set_gauge()
        log.info(
            "session.connected",
            role=session.role,
            rank=session.rank,
            world_size=session.world_size,
            peer_pid=session.peer_pid,
            **self._log_fields(conn),
        )
        return session

    async def _dispatch(self, conn: _Conn, session: Session, frame: dict[str, Any]) -> None:
        op = frame["op"]
        handler = self._handler
        try:
            if op == "saved":
                await handler.on_saved(session, frame)
            elif op == "failed":
                await handler.on_failed(session, frame)
            elif op == "status":
                await self._write(conn, protocol.encode({"op": "status", **await handler.on_status(session)}))
            elif op == "drill":
                if session.role != "control":
                    raise ProtocolError(
                        protocol.E_FORBIDDEN,
                        "drill is for control clients (hello with role 'control'); run `spotd checkpoint`",
                    )
                await self._write(
                    conn, protocol.encode({"op": "drill", **await handler.on_drill(session, frame)})
                )
            elif op == "finished":
                # The job is done (a trainer's finished(), or `spotd complete`): answered once it is marked.
                answer = await handler.on_finished(session, frame)
                await self._write(conn, protocol.encode(protocol.reply("finished", answer)))
        except ProtocolError as exc:
            # A refusal (path outside checkpoint_dir, ...): the connection stays usable.
            self._count(exc.code)
            log.warning("request.refused", op=op, code=exc.code, message=str(exc), **self._log_fields(conn))
            await self._write_error(conn, exc.code, str(exc), frame)
        except Exception as exc:
            log.exception("handler.failed", hook=op, **self._log_fields(conn))
            await self._write_error(
                conn,
                E_INTERNAL,
                f"spotd failed on {op!r}: {type(exc).__name__}; see journalctl -u spotd",
                frame,
            )

    async def _write_error(
        self, conn: _Conn, code: str, message: str, frame: dict[str, Any] | None = None
    ) -> None:
        error: dict[str, Any] = {"op": "error", "code": code, "message": message}
        if frame is not None:
            # Let the client match the error to what it sent.
            if "request_id" in frame:
                error["request_id"] = frame["request_id"]
            if frame.get("op") == "saved":
                error["path"] = frame.get("path")
        try:
            data = protocol.encode(error)
        except ProtocolError:
            data = protocol.encode({"op": "error", "code": code, "message": message[:1000]})
        await self._write(conn, data)

    # -- observability -----------------------------------------------------------------------------

    def _count(self, code: str) -> None:
        if self._metrics is not None:
            self._metrics.socket_errors.labels(code).inc()

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.trainers.set(len(self.trainers))

    @staticmethod
    def _log_fields(conn: _Conn) -> dict[str, Any]:
        s = conn.session
        if s is None:
            return {}
        return {"session": s.id, "name": s.name, "pid": s.pid, "peer_uid": s.peer_uid}
