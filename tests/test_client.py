"""The training-side client against a real IpcServer running on a background event loop."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from spotd.client import CheckpointRequest, SpotdUnavailableWarning, connect, control
from spotd.errors import ProtocolError
from spotd.events import format_time
from tests.fixtures.ipc import ThreadServer
from tests.util import wait_until


def checkpoint_frame(
    request_id: str = "r1", *, final: bool = True, seconds: float = 120.0
) -> dict[str, object]:
    deadline = format_time(datetime.now(UTC) + timedelta(seconds=seconds))
    return {
        "op": "checkpoint",
        "request_id": request_id,
        "reason": "spot",
        "deadline": deadline,
        "final": final,
    }


def test_import_stays_light() -> None:
    """Importing spotd.client loads none of aiohttp, boto3, structlog or prometheus_client."""
    code = (
        "import sys, spotd.client\n"
        "heavy = {'aiohttp', 'boto3', 'botocore', 'structlog', 'prometheus_client', 'asyncio'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_welcome_and_checkpoint_request(ipc_thread_server: ThreadServer) -> None:
    """The guard exposes the welcome, sets the flag and request on `checkpoint`, and saved() answers it."""
    ts = ipc_thread_server
    with connect("train", socket_path=ts.path, rank=3, world_size=8) as guard:
        assert guard.connected and guard.checkpoint_dir == "/ckpt"
        assert guard.welcome is not None and guard.welcome["job_id"] == "test-job"
        (session,) = wait_until(ts.trainers, what="trainer registered")
        assert (session.name, session.rank, session.world_size, session.pid) == ("train", 3, 8, os.getpid())
        assert not guard.checkpoint_requested and guard.request is None

        assert ts.broadcast(checkpoint_frame("r1")) == 1
        wait_until(lambda: guard.checkpoint_requested, what="checkpoint flag")
        request = guard.request
        assert isinstance(request, CheckpointRequest)
        assert (request.request_id, request.reason, request.final) == ("r1", "spot", True)
        assert 110 < request.seconds_left() <= 120

        guard.saved("step-5", step=5)
        assert not guard.checkpoint_requested and guard.request == request  # kept so .final can be read
        guard.saved(pathlib.Path("/ckpt/step-6"), step=6)
        wait_until(lambda: len(ts.handler.saved_paths()) == 2, what="both saves")
        frames = [f for _, f in ts.handler.frames]
        assert frames[0] == {"op": "saved", "request_id": "r1", "path": "step-5", "step": 5}
        assert frames[1] == {"op": "saved", "request_id": None, "path": "/ckpt/step-6", "step": 6}

        # The same request again (as after a reconnect) is already answered; a new one is not.
        ts.broadcast(checkpoint_frame("r1"))
        ts.broadcast(checkpoint_frame("r2", final=False))
        wait_until(lambda: guard.checkpoint_requested, what="second request")
        assert guard.request is not None and guard.request.request_id == "r2"
        guard.failed("disk full")
        wait_until(lambda: ts.handler.frames[-1][1]["op"] == "failed", what="failed frame")
        assert ts.handler.frames[-1][1] == {"op": "failed", "request_id": "r2", "message": "disk full"}
        assert not guard.checkpoint_requested


def test_saved_then_durable(ipc_thread_server: ThreadServer) -> None:
    """wait_durable is True after `durable` for the last save, False after an `error` for it or on timeout."""
    ts = ipc_thread_server
    with connect(socket_path=ts.path) as guard:
        assert not guard.wait_durable(0.01)  # nothing saved yet
        ts.handler.auto_durable = True
        guard.saved("a/model.pt", step=1)
        assert guard.wait_durable(5)
        guard.saved("../outside.pt", step=2)
        assert not guard.wait_durable(5)  # refused with path_refused
        ts.handler.auto_durable = False
        guard.saved("b/model.pt", step=3)
        assert not guard.wait_durable(0.1)
        assert guard.status() == {"op": "status", "phase": "Training", "trainers": 1}


def test_durable_stays_true_after_the_daemon_goes_away(ipc_thread_server: ThreadServer) -> None:
    """A save the daemon said was durable stays durable when the daemon then closes the socket (as at shutdown)."""
    ts = ipc_thread_server
    with connect(socket_path=ts.path, reconnect_interval_s=60) as guard:
        ts.handler.auto_durable = True
        guard.saved("a/model.pt", step=1)
        assert guard.wait_durable(5)
        ts.stop_server()
        wait_until(lambda: not guard.connected, what="disconnect noticed")
        assert guard.wait_durable(0)


def test_reconnects_after_daemon_restart(ipc_thread_server: ThreadServer) -> None:
    """After the daemon restarts, the guard says hello again and re-sends the save made while it was down."""
    ts = ipc_thread_server
    with connect("train", socket_path=ts.path, reconnect_interval_s=0.05) as guard:
        assert guard.connected
        ts.stop_server()
        wait_until(lambda: not guard.connected, what="disconnect noticed")
        guard.saved("during-outage.pt", step=7)  # must not raise
        assert not guard.wait_durable(0.05)
        ts.handler.auto_durable = True
        ts.start()
        wait_until(lambda: guard.connected, what="reconnected")
        wait_until(lambda: "during-outage.pt" in ts.handler.saved_paths(), what="save re-sent")
        assert guard.wait_durable(5)
        assert [s.name for s in ts.trainers()] == ["train"]
        assert len(ts.handler.ready) == 2


def test_no_daemon_warns_once_and_training_runs(short_tmp: pathlib.Path) -> None:
    """Without a daemon the guard warns once, never requests a checkpoint, and a training loop finishes."""
    path = str(short_tmp / "absent.sock")
    with pytest.warns(SpotdUnavailableWarning) as record:
        guard = connect("train", socket_path=path, reconnect_interval_s=0.01)
        steps = 0
        for step in range(2000):
            assert not guard.checkpoint_requested
            if step % 100 == 0:
                guard.saved(f"step-{step}", step=step)
                guard.failed("nothing")
                assert not guard.wait_durable(0.01)
            steps += 1
        assert guard.status() is None and guard.request is None and not guard.connected
        guard.close()
    assert steps == 2000
    assert len(record) == 1
    message = str(record[0].message)
    assert path in message and "systemctl status spotd" in message


def test_forked_child_is_inert(ipc_thread_server: ThreadServer) -> None:
    """In a forked child the inherited guard is inert and a fresh connect() makes its own connection."""
    ts = ipc_thread_server
    with connect("parent", socket_path=ts.path) as guard:
        ts.broadcast(checkpoint_frame("r1"))
        wait_until(lambda: guard.checkpoint_requested, what="request in parent")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                code |= 1 if guard.checkpoint_requested else 0
                code |= 2 if guard.connected or guard.request is not None else 0
                guard.saved("from-child.pt")  # must not reach the parent's socket
                code |= 4 if guard.wait_durable(0.05) else 0
                child = connect("child", socket_path=ts.path)
                code |= 8 if not child.connected else 0
                child.saved("child-own.pt")
                child.close()
                guard.close()
            except BaseException:
                code |= 64
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_until(lambda: "child-own.pt" in ts.handler.saved_paths(), what="child's own save")
        assert guard.checkpoint_requested and guard.connected
        guard.saved("parent.pt")
        wait_until(lambda: "parent.pt" in ts.handler.saved_paths(), what="parent's save")
        # Frames on one connection arrive in order, so a child write on it would be recorded by now.
        assert "from-child.pt" not in ts.handler.saved_paths()
        names = {s.name for s, _ in ts.handler.frames}
        assert names == {"parent", "child"}


def test_environment_defaults(ipc_thread_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() takes the socket from $SPOTD_SOCKET and rank/world size from $RANK/$WORLD_SIZE."""
    ts = ipc_thread_server
    monkeypatch.setenv("SPOTD_SOCKET", ts.path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with connect() as guard:
        assert guard.connected
        (session,) = wait_until(ts.trainers, what="trainer")
        assert (session.name, session.rank, session.world_size) == ("train", 1, 4)


def test_control_calls(ipc_thread_server: ThreadServer, short_tmp: pathlib.Path) -> None:
    """control() returns the reply, raises ProtocolError on an error reply, ConnectionError naming the fix."""
    ts = ipc_thread_server
    assert control("status", socket_path=ts.path) == {"op": "status", "phase": "Training", "trainers": 1}
    assert control("drill", socket_path=ts.path, reason="test")["ok"] is True
    assert ts.trainers() == []  # control clients are never trainers
    with pytest.raises(ProtocolError) as info:
        control("bogus", socket_path=ts.path)
    assert info.value.code == "unknown_op"
    absent = str(short_tmp / "absent.sock")
    with pytest.raises(ConnectionError, match="systemctl status spotd") as conn_info:
        control("status", socket_path=absent, timeout=1)
    assert absent in str(conn_info.value)
