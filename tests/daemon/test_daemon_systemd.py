"""A real `spotd run` under a stand-in for systemd: sd_notify datagrams on a NOTIFY_SOCKET the test binds."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from spotd.config import Config
from spotd.daemon.systemd import Notifier, watchdog_loop
from spotd.metrics import Metrics
from spotd.store import CommitInfo, Manifest, open_store
from spotd.tools.simulator import SimulatorThread
from tests.util import async_wait_until, wait_until

WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s


class NotifyListener:
    """What systemd does with $NOTIFY_SOCKET: bind it and read datagrams, each stamped on arrival."""

    def __init__(self, path: str, *, on_message: Any = None) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._on_message = on_message
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        # A short timeout lets the reader notice close() without a second wake-up channel.
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            if self._on_message is not None:
                self._on_message(fields)
            self.messages.append((time.time(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()

    def keys(self) -> list[str]:
        """One entry per datagram: its assignments' names joined, e.g. "READY+STATUS"."""
        return ["+".join(fields) for _, fields in list(self.messages)]

    def index(self, key: str, value: str) -> int:
        return next(i for i, (_, f) in enumerate(list(self.messages)) if f.get(key) == value)

    def count(self, key: str, value: str) -> int:
        return sum(1 for _, f in list(self.messages) if f.get(key) == value)


@pytest.fixture
def notify_path(short_tmp: Path) -> str:
    return str(short_tmp / "notify")


def _commit_one(store_root: Path, source_root: Path) -> Manifest:
    """Put one committed checkpoint in a file:// store, the way a previous instance would have."""
    step_dir = source_root / "step-7"
    step_dir.mkdir(parents=True)
    (step_dir / "model.pt").write_bytes(b"weights" * 1000)
    cfg = Config().replace(**{"job_id": "test-job", "store.uri": store_root.as_uri()})

    async def commit() -> Manifest:
        store = open_store(cfg, metrics=Metrics())
        try:
            info = CommitInfo(
                job_id="test-job",
                step=7,
                trainer="previous-instance",
                rank=None,
                world_size=None,
                request_id=None,
                reason="periodic",
                instance_id="i-previous",
                final=False,
            )
            return await store.commit(step_dir, checkpoint_dir=source_root, info=info)
        finally:
            await store.close()

    return asyncio.run(commit())


def _log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def test_daemon_sends_ready_after_restore_watchdog_while_alive_and_stopping_on_sigterm(
    tmp_path: Path,
    notify_path: str,
    imds_sim: SimulatorThread,
    spotd_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`spotd run` sends READY=1 after the restore, WATCHDOG=1 while alive, STOPPING=1 on SIGTERM; exits 0."""
    manifest = _commit_one(tmp_path / "store", tmp_path / "previous")
    ckpt = tmp_path / "ckpt-new"
    restored = ckpt / "step-7" / "model.pt"
    on_disk_at_ready: list[bool] = []

    def on_message(fields: dict[str, str]) -> None:
        # Checked the moment READY arrives: a later look could not tell "before" from "after".
        if fields.get("READY") == "1":
            on_disk_at_ready.append(restored.is_file())

    # systemd sets WATCHDOG_PID to the service's main pid; absent, the watchdog is meant for whoever reads it.
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    listener = NotifyListener(notify_path, on_message=on_message)
    try:
        d = spotd_daemon(
            imds_sim.url,
            checkpoint_dir=ckpt,
            env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
        )
        wait_until(lambda: listener.count("READY", "1"), timeout_s=5.0, what="READY=1")
        ready_at = listener.messages[listener.index("READY", "1")][0]
        (done,) = d.logs.events("restore.done")
        assert done["name"] == manifest.name
        assert _log_time(done) <= ready_at, "READY=1 arrived before the restore finished"
        assert on_disk_at_ready == [True], "READY=1 was sent before the checkpoint was on disk"
        assert listener.count("READY", "1") == 1
        assert restored.read_bytes() == b"weights" * 1000

        # Systemd sees the restore as progress before READY: a status line and more start time.
        before_ready = listener.messages[: listener.index("READY", "1")]
        assert any(f.get("STATUS", "").startswith("restoring ") for _, f in before_ready)
        assert any("EXTEND_TIMEOUT_USEC" in f for _, f in before_ready)
        assert not any("WATCHDOG" in f for _, f in before_ready)

        # Five pings at 0.2 s: about a second, with room for a loaded machine.
        wait_until(lambda: listener.count("WATCHDOG", "1") >= 5, timeout_s=5.0, what="five WATCHDOG=1 pings")
        assert d.proc.poll() is None

        assert d.stop(signal.SIGTERM, timeout=20.0) == 0
        wait_until(lambda: listener.count("STOPPING", "1") == 1, timeout_s=5.0, what="STOPPING=1")
        stopping = listener.index("STOPPING", "1")
        assert stopping > listener.index("READY", "1")
        # The watchdog task is cancelled with no await between it and STOPPING=1.
        assert not any("WATCHDOG" in f for _, f in listener.messages[stopping:])
        assert d.logs.events("daemon.stopping")
    finally:
        listener.close()


async def test_a_hung_event_loop_stops_the_watchdog_pings(notify_path: str) -> None:
    """While the loop is blocked no WATCHDOG=1 is sent, which is what lets systemd restart a hung daemon."""
    listener = NotifyListener(notify_path)
    task = asyncio.create_task(watchdog_loop(Notifier(socket_path=notify_path), interval_s=0.02))
    try:
        await async_wait_until(lambda: listener.count("WATCHDOG", "1") >= 3, timeout_s=5.0, what="pings")
        # The hang under test: a blocking call on the loop, as a stuck boto3 call or a deadlock would be.
        hung_from = time.time()
        time.sleep(0.5)  # noqa: ASYNC251  (blocking the loop is the point)
        hung_until = time.time()
        await async_wait_until(
            lambda: any(t > hung_until for t, _ in listener.messages), timeout_s=5.0, what="pings resume"
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        listener.close()
    # One ping may be in flight as the hang starts; none is sent inside it.
    during = [t for t, _ in listener.messages if hung_from + 0.05 < t < hung_until]
    assert during == []
