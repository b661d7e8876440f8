"""The daemon's Unix socket server: trainers and control clients speak NDJSON (:mod:`spotd.protocol`) to it.

One task per connection reads frames in order and awaits the :class:`Handler`; connections never wait on
each other. Every write is bounded by ``write_timeout_s``: a peer that stops reading is dropped rather
than allowed to stall a broadcast. The socket file itself (its path, a stale one, mode and group, peer
credentials) is :mod:`.sockfile`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, Protocol

from spotd import protocol
from spotd.daemon.sockfile import SocketFile, peer_credentials
from spotd.errors import ConfigError, ProtocolError
from spotd.logs import get_logger
from spotd.metrics import Metrics

__all__ = ["E_BUSY", "E_INTERNAL", "Handler", "IpcServer", "Session"]

log = get_logger("spotd.ipc")

#: Error codes this module adds to protocol.py's.
E_INTERNAL: Final = "internal"
E_BUSY: Final = "busy"
ROLES: Final = frozenset({"trainer", "control"})


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
    # torchrun's placement and the run's identity, as hello said them (None when not said).
    local_rank: int | None = None
    local_world_size: int | None = None
    node_rank: int | None = None
    run_id: str | None = None


class Handler(Protocol):
    """What the daemon does with frames; the coordinator implements it."""

    def welcome(self, session: Session) -> dict[str, Any]: ...
    async def on_ready(self, session: Session) -> None: ...
    async def on_writing(self, session: Session, frame: dict[str, Any]) -> None: ...
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


class IpcServer:
    """The Unix socket server. ``start()``, then ``send``/``broadcast``; ``close()`` when done."""

    __slots__ = (
        "_conns",
        "_file",
        "_group",
        "_handler",
        "_hello_timeout_s",
        "_max_connections",
        "_metrics",
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
        self._file = SocketFile(path=path, group=group, mode=mode)
        self._handler = handler
        self._metrics = metrics
        self._group = group
        self._hello_timeout_s = hello_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        # Every connection task, handshake done or not, with its writer, so close() can reach them all.
        self._tasks: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # Handshake done, welcome written: these receive send()/broadcast().
        self._conns: dict[str, _Conn] = {}

    @property
    def path(self) -> str:
        return self._file.path

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
        await self._file.prepare()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect,
                path=self.path,
                limit=protocol.MAX_LINE,
                # A burst of trainers connecting at once must not hit a full backlog.
                backlog=max(128, min(self._max_connections, 4096)),
            )
        except OSError as exc:
            raise ConfigError(
                "socket.path",
                f"cannot listen on {self.path}: {exc.strerror or exc}",
                "run spotd as root (the systemd unit does) or point socket.path at a writable directory",
            ) from exc
        try:
            self._file.secure()
        except ConfigError:
            await self._stop_listener()
            raise
        self._set_gauge()
        log.info("socket.listening", path=self.path, mode=f"{self._file.mode:o}", group=self._group or None)

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
        self._file.remove()
        self._set_gauge()
        log.info("socket.closed", path=self.path)

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
        peer_pid, peer_uid, peer_gid = peer_credentials(conn.writer)
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
            local_rank=frame.get("local_rank"),
            local_world_size=frame.get("local_world_size"),
            node_rank=frame.get("node_rank"),
            run_id=frame.get("run_id"),
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
        if not await self._write(conn, protocol.encode(protocol.welcome(session=session.id, extra=extra))):
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
            elif op == "writing":
                await handler.on_writing(session, frame)
            elif op == "failed":
                await handler.on_failed(session, frame)
            elif op == "status":
                body = await handler.on_status(session)
                await self._write(conn, protocol.encode(protocol.reply("status", body)))
            elif op == "drill":
                if session.role != "control":
                    raise ProtocolError(
                        protocol.E_FORBIDDEN,
                        "drill is for control clients (hello with role 'control'); run `spotd checkpoint`",
                    )
                body = await handler.on_drill(session, frame)
                await self._write(conn, protocol.encode(protocol.reply("drill", body)))
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
        # Let the client match the error to what it sent: its request_id, and for a save its path.
        request_id = frame["request_id"] if frame is not None and "request_id" in frame else protocol.OMIT
        path = frame.get("path") if frame is not None and frame.get("op") == "saved" else protocol.OMIT
        try:
            data = protocol.encode(
                protocol.error(code=code, message=message, request_id=request_id, path=path)
            )
        except ProtocolError:
            data = protocol.encode(protocol.error(code=code, message=message[:1000]))
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
