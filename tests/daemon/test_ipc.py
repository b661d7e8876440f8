"""The daemon's Unix socket server, exercised over real sockets in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pathlib
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from spotd import protocol
from spotd.daemon.ipc import IpcServer
from spotd.errors import ConfigError, DaemonAlreadyRunning
from spotd.metrics import Metrics
from tests.fixtures.ipc import RecordingHandler
from tests.util import async_wait_until

HELLO = {"op": "hello", "v": 1, "name": "t", "pid": 1234, "rank": 0, "world_size": 2}


class Peer:
    """An asyncio client speaking raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(protocol.encode(message))
        await self.writer.drain()

    async def recv(self, deadline_s: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), deadline_s)
        assert line, "connection closed"
        return protocol.decode(line)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


ServerFactory = Callable[..., Awaitable[tuple[IpcServer, RecordingHandler, Metrics]]]
PeerFactory = Callable[..., Awaitable[tuple[Peer, dict[str, Any]]]]


@pytest.fixture
async def make_server(short_tmp: pathlib.Path) -> AsyncIterator[ServerFactory]:
    servers: list[IpcServer] = []

    async def factory(**kwargs: Any) -> tuple[IpcServer, RecordingHandler, Metrics]:
        handler = kwargs.pop("handler", None) or RecordingHandler()
        metrics = Metrics(registry=CollectorRegistry())
        kwargs.setdefault("path", str(short_tmp / "d.sock"))
        server = IpcServer(handler=handler, metrics=metrics, **kwargs)
        await server.start()
        servers.append(server)
        handler.server = server
        return server, handler, metrics

    yield factory
    for server in servers:
        await server.close(grace_s=1.0)


@pytest.fixture
async def peer(short_tmp: pathlib.Path) -> AsyncIterator[PeerFactory]:
    peers: list[Peer] = []

    async def factory(
        hello: dict[str, Any] | None = HELLO, path: str | None = None
    ) -> tuple[Peer, dict[str, Any]]:
        reader, writer = await asyncio.open_unix_connection(path or str(short_tmp / "d.sock"))
        p = Peer(reader, writer)
        peers.append(p)
        if hello is None:
            return p, {}
        await p.send(hello)
        return p, await p.recv()

    yield factory
    for p in peers:
        await p.close()


def raw_exchange(path: str, payloads: list[bytes], timeout: float = 5.0) -> tuple[list[dict[str, Any]], bool]:
    """Send payloads on a blocking socket, then read until the server closes; (frames, closed)."""
    buf = b""
    closed = False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        for payload in payloads:
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed on us mid-payload; what it said is still queued
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            buf += data
    return [json.loads(line) for line in buf.splitlines() if line], closed


def errors(metrics: Metrics, code: str) -> float:
    return metrics.registry.get_sample_value("spotd_socket_errors_total", {"code": code}) or 0.0


async def test_handshake_welcome_and_session(make_server: ServerFactory, peer: PeerFactory) -> None:
    """A hello gets a welcome with the session id and the handler's fields, and the trainer is registered."""
    server, handler, metrics = await make_server()
    _, welcome = await peer()
    assert welcome["op"] == "welcome" and welcome["v"] == 1
    assert welcome["checkpoint_dir"] == "/ckpt" and welcome["job_id"] == "test-job"
    (session,) = server.trainers
    assert welcome["session"] == session.id
    assert (session.role, session.name, session.pid, session.rank, session.world_size) == (
        "trainer",
        "t",
        1234,
        0,
        2,
    )
    await async_wait_until(lambda: handler.ready, what="on_ready")
    assert metrics.registry.get_sample_value("spotd_trainers") == 1


async def test_peer_credentials_recorded(make_server: ServerFactory, peer: PeerFactory) -> None:
    """The session carries the kernel's SO_PEERCRED pid/uid/gid, not what the client claims."""
    server, _, _ = await make_server()
    await peer()
    (session,) = server.trainers
    assert (session.peer_pid, session.peer_uid, session.peer_gid) == (os.getpid(), os.getuid(), os.getgid())
    assert session.pid == 1234


async def test_socket_mode_and_group_ignore_umask(
    short_tmp: pathlib.Path, make_server: ServerFactory
) -> None:
    """The socket is mode 0660 with the configured group under any umask, in a created 0755 parent."""
    group = grp.getgrgid(os.getgid()).gr_name
    path = short_tmp / "run" / "spotd" / "s.sock"
    old = os.umask(0o077)
    try:
        await make_server(path=str(path), group=group)
    finally:
        os.umask(old)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


async def test_unknown_group_is_config_error(make_server: ServerFactory) -> None:
    """A socket.group that does not exist is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        await make_server(group="no-such-group-spotd")
    assert info.value.key == "socket.group"


async def test_stale_socket_is_replaced(
    short_tmp: pathlib.Path, make_server: ServerFactory, peer: PeerFactory
) -> None:
    """A socket file nobody listens on (a crashed daemon's) is replaced."""
    path = str(short_tmp / "d.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    server, _, _ = await make_server()
    await peer()
    assert len(server.trainers) == 1


async def test_live_socket_raises_already_running(
    short_tmp: pathlib.Path, make_server: ServerFactory, peer: PeerFactory
) -> None:
    """A server on a live socket raises DaemonAlreadyRunning naming path and fix; the first serves on."""
    first, _, _ = await make_server()
    with pytest.raises(DaemonAlreadyRunning) as info:
        await make_server()
    assert str(short_tmp / "d.sock") in str(info.value) and "systemctl stop spotd" in str(info.value)
    await peer()
    assert len(first.trainers) == 1


async def test_non_socket_file_is_never_deleted(short_tmp: pathlib.Path, make_server: ServerFactory) -> None:
    """A regular file at the socket path is a clear ConfigError and is left in place."""
    path = short_tmp / "d.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await make_server()
    assert path.read_text() == "precious"


@pytest.mark.parametrize(
    ("payloads", "code"),
    [
        ([protocol.encode(HELLO), b"{not json\n"], protocol.E_BAD_JSON),
        ([protocol.encode(HELLO), b"[1, 2]\n"], protocol.E_BAD_FRAME),
        ([protocol.encode(HELLO), b'{"op":"launch_missiles"}\n'], protocol.E_UNKNOWN_OP),
        ([protocol.encode(HELLO), b'{"op":"saved","path":"x","step":true}\n'], protocol.E_BAD_FRAME),
        ([protocol.encode(HELLO), b"x" * (1 << 20) + b"\n"], protocol.E_TOO_LONG),
        ([b'{"op":"status"}\n'], protocol.E_NO_HELLO),
        ([protocol.encode({**HELLO, "v": 2})], protocol.E_VERSION),
    ],
    ids=["bad-json", "not-object", "unknown-op", "bad-field", "1MiB-line", "no-hello", "wrong-version"],
)
async def test_bad_frame_closes_only_that_connection(
    make_server: ServerFactory, peer: PeerFactory, payloads: list[bytes], code: str
) -> None:
    """A bad frame gets an error with its code and closes that connection; another trainer is still served."""
    server, _, metrics = await make_server()
    good, _ = await peer()
    frames, closed = await asyncio.to_thread(raw_exchange, server.path, payloads)
    assert closed
    assert frames[-1]["op"] == "error" and frames[-1]["code"] == code, frames
    assert errors(metrics, code) == 1
    await good.send({"op": "status"})
    assert (await good.recv())["op"] == "status"
    await async_wait_until(lambda: len(server.trainers) == 1, what="only the good trainer left")


async def test_hello_timeout_drops_silent_connection(make_server: ServerFactory) -> None:
    """A connection that never says hello is closed after hello_timeout_s."""
    server, _, metrics = await make_server(hello_timeout_s=0.2)
    start = time.monotonic()
    frames, closed = await asyncio.to_thread(raw_exchange, server.path, [])
    assert closed and frames == [] and time.monotonic() - start < 3
    assert errors(metrics, "hello_timeout") == 1


async def test_handler_protocol_error_keeps_connection(make_server: ServerFactory, peer: PeerFactory) -> None:
    """A handler's ProtocolError becomes an error frame with code and request_id; the connection is kept."""
    _, handler, _ = await make_server()
    p, _ = await peer()
    await p.send({"op": "saved", "request_id": "r1", "path": "../etc/passwd", "step": 3})
    error = await p.recv()
    assert error == {
        "op": "error",
        "code": "path_refused",
        "message": "../etc/passwd is outside checkpoint_dir",
        "request_id": "r1",
        "path": "../etc/passwd",
    }
    handler.raise_in_failed = RuntimeError("boom")
    await p.send({"op": "failed", "request_id": "r1", "message": "disk full"})
    assert (await p.recv())["code"] == "internal"
    await p.send({"op": "status"})
    assert await p.recv() == {"op": "status", "phase": "Training", "trainers": 1}


async def test_drill_needs_control_role(make_server: ServerFactory, peer: PeerFactory) -> None:
    """A trainer's drill is forbidden (connection kept); a control client's is answered, and is no trainer."""
    server, _, _ = await make_server()
    trainer, _ = await peer()
    await trainer.send({"op": "drill", "reason": "x"})
    assert (await trainer.recv())["code"] == protocol.E_FORBIDDEN
    control, _ = await peer({"op": "hello", "v": 1, "name": "cli", "role": "control"})
    await control.send({"op": "drill", "reason": "test"})
    assert await control.recv() == {"op": "drill", "ok": True, "reason": "test"}
    assert [s.name for s in server.trainers] == ["t"]


async def test_long_handler_does_not_block_other_connections(
    make_server: ServerFactory, peer: PeerFactory
) -> None:
    """While one connection's drill is still running, another connection's status is answered."""
    _, handler, _ = await make_server()
    handler.drill_gate = asyncio.Event()
    control, _ = await peer({"op": "hello", "v": 1, "name": "cli", "role": "control"})
    trainer, _ = await peer()
    await control.send({"op": "drill"})
    await async_wait_until(lambda: handler.frames, what="drill started")
    await trainer.send({"op": "status"})
    assert (await trainer.recv(deadline_s=2))["op"] == "status"
    handler.drill_gate.set()
    assert (await control.recv())["op"] == "drill"


async def test_many_connections_at_once(make_server: ServerFactory, peer: PeerFactory) -> None:
    """200 trainers connecting at once are all welcomed, counted, reached by a broadcast and cleaned up."""
    server, handler, metrics = await make_server()
    peers = await asyncio.gather(*(peer({**HELLO, "name": f"t{i}"}) for i in range(200)))
    assert len(server.trainers) == 200
    assert metrics.registry.get_sample_value("spotd_trainers") == 200
    assert await server.broadcast({"op": "checkpoint", "request_id": "r", "reason": "drill"}) == 200
    got = await asyncio.gather(*(p.recv() for p, _ in peers))
    assert all(g["request_id"] == "r" for g in got)
    await asyncio.gather(*(p.close() for p, _ in peers))
    await async_wait_until(lambda: not server.trainers and len(handler.disconnected) == 200, what="all gone")
    assert metrics.registry.get_sample_value("spotd_trainers") == 0


async def test_max_connections_refuses_extra(make_server: ServerFactory, peer: PeerFactory) -> None:
    """Past max_connections a new connection gets a 'busy' error and is closed; existing ones stay."""
    server, _, _ = await make_server(max_connections=1)
    await peer()
    frames, closed = await asyncio.to_thread(raw_exchange, server.path, [protocol.encode(HELLO)])
    assert closed and frames[-1]["code"] == "busy"
    assert len(server.trainers) == 1


async def test_client_vanishing_mid_request(make_server: ServerFactory, peer: PeerFactory) -> None:
    """A peer that closes while its status is being computed is cleaned up and the server keeps serving."""
    server, handler, _ = await make_server()
    handler.status_gate = asyncio.Event()
    p, _ = await peer()
    await p.send({"op": "status"})
    await async_wait_until(lambda: handler.status_entered == 1, what="status in progress")
    await p.close()
    handler.status_gate.set()
    await async_wait_until(lambda: not server.trainers and handler.disconnected, what="session cleaned up")
    q, _ = await peer()
    await q.send({"op": "status"})
    assert (await q.recv())["op"] == "status"


async def test_broadcast_with_stuck_client_does_not_delay_others(
    make_server: ServerFactory, peer: PeerFactory
) -> None:
    """A trainer that stops reading is dropped after write_timeout_s; the others get every frame at once."""
    write_timeout = 0.5
    server, _, metrics = await make_server(write_timeout_s=write_timeout)
    await peer({**HELLO, "name": "stuck"})  # never reads again
    fast = [await peer({**HELLO, "name": f"fast{i}"}) for i in range(3)]
    received: dict[int, list[float]] = {}

    async def read(p: Peer) -> None:
        while True:
            frame = await p.recv(deadline_s=30)
            received.setdefault(frame["seq"], []).append(time.monotonic())

    readers = [asyncio.create_task(read(p)) for p, _ in fast]
    try:
        pad = "x" * 60_000
        for seq in range(200):
            start = time.monotonic()
            reached = await server.broadcast(
                {"op": "checkpoint", "request_id": str(seq), "seq": seq, "pad": pad}
            )
            took = time.monotonic() - start
            await async_wait_until(lambda s=seq: len(received.get(s, ())) == 3, what=f"frame {seq} at fast")  # type: ignore[misc]
            if reached == 3:
                break
        else:
            pytest.fail("the stuck trainer was never dropped")
        assert took >= write_timeout * 0.8
        # The fast trainers had the frame long before the stuck one's write gave up.
        assert max(received[seq]) - start < write_timeout / 2
        assert sorted(s.name for s in server.trainers) == ["fast0", "fast1", "fast2"]
        assert errors(metrics, "write_timeout") == 1
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_close_removes_socket_and_ends_sessions(make_server: ServerFactory, peer: PeerFactory) -> None:
    """close() disconnects every session (on_disconnect called) and removes the socket file."""
    server, handler, _ = await make_server()
    p, _ = await peer()
    await server.close(grace_s=1.0)
    assert not await asyncio.to_thread(os.path.exists, server.path)
    assert handler.disconnected and not server.trainers
    assert await p.reader.read() == b""
