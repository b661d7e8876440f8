"""sd_notify on a real datagram socket, and the unit files checked by systemd-analyze."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotd.daemon.systemd import Notifier, watchdog_loop
from spotd.tools import install
from tests.util import async_wait_until, require_tool

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(short_tmp / "notify")
    sock.bind(path)
    sock.settimeout(5.0)
    try:
        yield sock, path
    finally:
        sock.close()


def test_ready_status_stopping_arrive_as_sd_notify_datagrams(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """ready(), status() and stopping() send newline-separated assignments to $NOTIFY_SOCKET."""
    sock, path = notify_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("restored step 1200")
    assert sock.recv(4096) == b"READY=1\nSTATUS=restored step 1200"
    assert notifier.status("training\nstep 5")
    assert sock.recv(4096) == b"STATUS=training step 5"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"


def test_abstract_socket_names_are_supported() -> None:
    """A NOTIFY_SOCKET starting with '@' is an abstract-namespace address."""
    name = f"spotd-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        assert Notifier(socket_path="@" + name).notify(READY=1, MAINPID=42)
        assert sock.recv(4096) == b"READY=1\nMAINPID=42"


def test_missing_or_broken_socket_never_raises(short_tmp: Path) -> None:
    """Without $NOTIFY_SOCKET, or with a dead one, every call returns False instead of raising."""
    assert not Notifier(environ={}).enabled
    assert not Notifier(environ={}).ready()
    assert not Notifier(socket_path="relative/path").watchdog()
    assert not Notifier(socket_path=str(short_tmp / "nobody-listens")).ready("x")


def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid() -> None:
    """watchdog_interval() halves $WATCHDOG_USEC and ignores a watchdog meant for another process."""
    pid = str(os.getpid())
    assert Notifier(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}).watchdog_interval() == 15.0
    assert Notifier(environ={"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert Notifier(environ={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier(environ={"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier(environ={}).watchdog_interval() is None


async def test_watchdog_loop_pings_from_the_event_loop(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog_loop sends WATCHDOG=1 repeatedly until it is cancelled."""
    sock, path = notify_socket
    sock.setblocking(False)
    received: list[bytes] = []

    def drain() -> bool:
        while True:
            try:
                received.append(sock.recv(4096))
            except BlockingIOError:
                return len(received) >= 3

    task = asyncio.create_task(watchdog_loop(Notifier(socket_path=path), interval_s=0.02))
    try:
        await async_wait_until(drain, timeout_s=5.0, what="three WATCHDOG=1 pings")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert set(received) == {b"WATCHDOG=1"}


async def test_watchdog_loop_refuses_a_zero_interval() -> None:
    """A non-positive interval is a programming error named in the message, not a busy loop."""
    with pytest.raises(ValueError, match="interval_s"):
        await watchdog_loop(Notifier(environ={}), interval_s=0)


def _render(tmp_path: Path, *extra: str) -> Path:
    """Install into a tree with ExecStart on an executable that exists, which verify insists on."""
    root = tmp_path / "root"
    root.mkdir()
    args = [
        "--root",
        str(root),
        "--spotd-bin",
        sys.executable,
        "--job-id",
        "job1",
        "--train-cmd",
        "python t.py",
        "--train-user",
        "ubuntu",
        *extra,
    ]
    assert install._standalone(args) == 0
    return root / "etc/systemd/system"


def test_units_pass_systemd_analyze_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """systemd-analyze verify accepts both units, the template instance and its drop-in, without warnings."""
    analyze = require_tool("systemd-analyze", "systemd")
    unit_dir = _render(tmp_path)
    capsys.readouterr()
    done = subprocess.run(
        [analyze, "verify", "./spotd.service", "./spotd-train@.service", "./spotd-train@job1.service"],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def _exposure(analyze: str, unit: Path) -> float:
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", f"./{unit.name}"],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, f"no exposure level in systemd-analyze output:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1))


def test_spotd_service_sandbox_exposure_is_at_most_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """systemd-analyze security --offline=true rates spotd.service at an exposure of 2.0 or less."""
    analyze = require_tool("systemd-analyze", "systemd")
    assert _exposure(analyze, UNITS / "spotd.service") <= 2.0
    # The rendered unit (another checkpoint_dir) keeps the same sandbox.
    unit_dir = _render(tmp_path, "--checkpoint-dir", "/data/ckpt")
    capsys.readouterr()
    assert _exposure(analyze, unit_dir / "spotd.service") <= 2.0


def test_spotd_service_keeps_the_contract_settings() -> None:
    """The unit is Type=notify with a watchdog, and its stop timeout exceeds the default shutdown grace."""
    text = (UNITS / "spotd.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"] == "30s"
    assert settings["Restart"] == "on-failure"
    assert settings["RuntimeDirectory"] == "spotd"
    assert settings["User"] == settings["Group"] == "spotd"
    assert settings["ExecStart"] == "/opt/spotd/bin/spotd run --config /etc/spotd/spotd.toml"
    from spotd.config import Config

    assert float(settings["TimeoutStopSec"].rstrip("s")) > Config().policy.shutdown_grace + 30


def test_packaged_unit_copies_match_the_repository_units() -> None:
    """spotd/data carries the same unit files as systemd/, so `spotd install` installs what is reviewed."""
    for name in ("spotd.service", "spotd-train@.service"):
        assert (REPO / "spotd/data" / name).read_text() == (UNITS / name).read_text(), (
            f"cp systemd/{name} spotd/data/{name}"
        )
