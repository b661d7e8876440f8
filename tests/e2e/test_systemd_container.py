"""spotd under a real systemd: a Debian container booted by systemd-nspawn, set up by scripts/user-data.sh.

Slow, and only where a container can boot: root, systemd-nspawn and debootstrap (scripts/test installs
both), and a Debian mirror the first time. The Debian root is cached under $SPOTD_TEST_CACHE (default
/var/cache/spotd-test), keyed by what it is built from, and booted with a throw-away overlay, so the
cache stays clean; the daemon's dependencies are cached there as wheels, so a warm run needs no network.

The container has a private network (loopback only): nothing in it can reach 169.254.169.254, and the
IMDS it sees is `spotd simulate-imds` on loopback. The store is a file:// directory bind-mounted from the
host, where the test reads the commits.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.util import wait_until

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SPOTD_TEST_CACHE", "/var/cache/spotd-test"))
SUITE = "bookworm"  # its python3 is 3.11, the Python spotd supports first
MIRROR = os.environ.get("SPOTD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What an EC2 image has that matters here: systemd as PID 1 and a Python >= 3.11 whose venv works.
# python3-venv too: with python3.11-venv alone debootstrap fails to configure the base system.
PACKAGES = ("systemd", "systemd-sysv", "python3.11", "python3.11-venv", "python3-venv")
CONTAINER_PYTHON = "3.11"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

JOB = "e2e"
TRAIN_USER = "trainer"
IMDS_PORT = 8169
UNIT = "spotd.service"
TRAIN_UNIT = f"spotd-train@{JOB}.service"

# -- what the host must have -------------------------------------------------------------------------


def _tools() -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-nspawn boots the container (run scripts/test as root)")
    found = {name: shutil.which(name) for name in ("systemd-nspawn", "debootstrap", "nsenter")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not found: apt-get install -y systemd-container debootstrap util-linux "
            "(scripts/test does this when it runs as root)"
        )
    return {name: str(path) for name, path in found.items()}


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """Two test runs on one machine build each cache entry once, not side by side."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _rootfs(debootstrap: str) -> Path:
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)} v1".encode()).hexdigest()[:12]
    target = CACHE / f"debian-rootfs-{SUITE}-{key}"
    with _cache_lock():
        if (target / "usr/lib/systemd/systemd").exists():
            return target
        partial = CACHE / f".{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        argv = [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial)]
        done = subprocess.run([*argv, MIRROR], capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            log = partial / "debootstrap/debootstrap.log"
            text = log.read_text(errors="replace") if log.is_file() else done.stdout + done.stderr
            shutil.rmtree(partial, ignore_errors=True)
            tail = "\n".join(text.splitlines()[-15:])
            pytest.skip(
                f"debootstrap of {SUITE} from {MIRROR} failed (a mirror out of reach? set "
                f"SPOTD_TEST_DEBIAN_MIRROR), its log ends:\n{tail}"
            )
        shutil.rmtree(partial / "var/cache/apt/archives", ignore_errors=True)
        partial.rename(target)
    return target


def _source_copy(dest: Path) -> Path:
    """The working tree without build leftovers: a stale build/lib would put removed modules in the wheel."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    return Path(shutil.copytree(REPO, dest, ignore=ignore))


def _pip(*args: str, timeout_s: float = 300) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def _wheels(tmp: Path) -> tuple[Path, Path]:
    """The spotd wheel of this tree, and a directory of its dependencies' wheels for the container."""
    dist = tmp / "dist"
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(_source_copy(tmp / "src")))
    (wheel,) = dist.glob("spotd-*.whl")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(f"{CONTAINER_PYTHON} {sorted(deps)}".encode()).hexdigest()[:12]
    wheelhouse = CACHE / f"wheels-py{CONTAINER_PYTHON}-{key}"
    with _cache_lock():
        if not wheelhouse.is_dir():
            partial = CACHE / f".{wheelhouse.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            _pip(
                "download",
                "--quiet",
                "--only-binary=:all:",
                f"--python-version={CONTAINER_PYTHON}",
                "--dest",
                str(partial),
                str(wheel),
            )
            for own in partial.glob("spotd-*.whl"):
                own.unlink()
            partial.rename(wheelhouse)
    return wheel, wheelhouse


def render_user_data(values: dict[str, str]) -> str:
    """scripts/user-data.sh with the variables at its top filled in, the way launch-spot.sh does it."""
    text = (REPO / "scripts/user-data.sh").read_text()
    for name, value in values.items():
        line = f'SPOTD_{name}="{value}"'
        text, n = re.subn(rf'^SPOTD_{name}="[^"]*"', lambda _m, line=line: line, text, flags=re.MULTILINE)
        assert n == 1, f"scripts/user-data.sh has no SPOTD_{name}= line"
    return text


# -- the container ------------------------------------------------------------------------------------


class Container:
    """A booted systemd-nspawn container; commands run in it through nsenter (the host has no machined)."""

    def __init__(self, *, tools: dict[str, str], rootfs: Path, binds: list[str], console: Path) -> None:
        self._tools = tools
        self._rootfs = rootfs
        self._binds = binds
        self._console = console
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self, *, boot_timeout_s: float = 120) -> None:
        argv = [
            self._tools["systemd-nspawn"],
            "--quiet",
            f"--directory={self._rootfs}",
            "--boot",
            # No machined or D-Bus on the host: no registration, no scope unit of our own.
            "--register=no",
            "--keep-unit",
            # Writes go to a tmpfs overlay: the cached root stays as debootstrap left it.
            "--volatile=overlay",
            "--private-network",
            f"--machine=spotd-e2e-{os.getpid()}",
            *self._binds,
        ]
        with open(self._console, "wb") as console:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console)
        try:
            self.leader = wait_until(
                self._find_leader, timeout_s=30, what="the container's PID 1", interval_s=0.1
            )
            state = wait_until(
                self._booted, timeout_s=boot_timeout_s, what="the container's boot to finish", interval_s=0.25
            )
        except AssertionError as exc:
            tail = self.console_tail()
            self.stop()
            pytest.skip(f"the container cannot boot on this machine ({exc}):\n{tail}")
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            print(f"container booted degraded; failed units:\n{failed}")

    def _find_leader(self) -> int:
        proc = self._proc
        assert proc is not None
        if proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {proc.returncode}")
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN
            children = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat") if _ppid(p) == proc.pid]
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def _booted(self) -> str:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self._proc.returncode}")
        state = self.run("systemctl", "is-system-running", check=False, timeout_s=10).stdout.strip()
        return state if state in ("running", "degraded") else ""

    def run(
        self,
        *argv: str,
        env: dict[str, str] | None = None,
        input: str | None = None,
        timeout_s: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside, as root, with a clean environment (none of the test's SPOTD_* leak in)."""
        clean = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})}
        done = subprocess.run(
            [
                self._tools["nsenter"],
                f"--target={self.leader}",
                "--all",
                "--",
                "/usr/bin/env",
                "-i",
                *(f"{k}={v}" for k, v in clean.items()),
                *argv,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check:
            assert done.returncode == 0, (
                f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname {path})" && cat > {path}', input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def poweroff(self, *, timeout_s: float) -> int:
        """Shut the container down the way an instance stops, and wait for systemd-nspawn to exit."""
        assert self._proc is not None
        self.run("systemctl", "poweroff", "--no-block", check=False)
        return self._proc.wait(timeout_s)

    def stop(self) -> None:
        """Whatever state the test left it in: poweroff, then SIGTERM, then SIGKILL to our nspawn."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            if self.leader:
                self.poweroff(timeout_s=100)
                return
        for send, wait_s in ((proc.terminate, 30), (proc.kill, 10)):
            send()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
                return

    def console_tail(self, lines: int = 40) -> str:
        text = self._console.read_bytes().decode(errors="replace")
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-lines:])

    def diagnostics(self) -> str:
        parts = [f"--- console (last lines)\n{self.console_tail()}"]
        if self._proc is not None and self._proc.poll() is None and self.leader:
            for argv in (
                ("tail", "-n", "40", "/var/log/spotd-user-data.log"),
                ("systemctl", "status", "--no-pager", "--lines=0", UNIT, TRAIN_UNIT),
                ("journalctl", "--no-pager", "-o", "cat", "-n", "60", "-u", UNIT, "-u", TRAIN_UNIT),
            ):
                with contextlib.suppress(Exception):
                    done = self.run(*argv, check=False, timeout_s=20)
                    parts.append(f"--- {' '.join(argv)}\n{done.stdout}{done.stderr}")
        return "\n".join(parts)


def _ppid(stat: Path) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        # The command name, in parentheses, may hold spaces: the fields after it are fixed.
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return 0


# -- reading what happened ------------------------------------------------------------------------------


def trainer_events(results: Path) -> list[dict[str, Any]]:
    path = results / "trainer.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line still being written
            events.append(json.loads(line))
    return events


def committed(store: Path) -> list[dict[str, Any]]:
    """Every committed checkpoint of the job: a MANIFEST.json makes it exist (the store contract)."""
    return [json.loads(m.read_text()) for m in sorted((store / JOB / "checkpoints").glob("*/MANIFEST.json"))]


def commit_of(store: Path, event: dict[str, Any]) -> dict[str, Any] | None:
    """The commit holding the file a trainer event names, with its bytes in the store, or None."""
    for manifest in committed(store):
        for entry in manifest["files"]:
            if (
                entry["path"] in (event["path"], Path(event["path"]).name)
                and manifest["step"] == event["step"]
            ):
                data = store / JOB / "checkpoints" / manifest["name"] / entry["path"]
                if data.is_file() and data.stat().st_size == entry["size"]:
                    return manifest
    return None


# -- the test -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_user_data_boot_ready_watchdog_spot_and_last_chance_checkpoints(tmp_path: Path) -> None:
    """On a booted systemd, user-data installs spotd and a trainer; spotd is READY and survives its watchdog, the trainer's spot checkpoint is committed and it exits 0, and at poweroff spotd.client turns the trainer's SIGTERM into a last-chance save that is still committed, because the trainer stops before spotd."""
    tools = _tools()
    rootfs = _rootfs(tools["debootstrap"])
    wheel, wheelhouse = _wheels(tmp_path)
    store, results, boot = tmp_path / "store", tmp_path / "results", tmp_path / "boot"
    for shared in (store, results, boot):
        shared.mkdir()
        # Written from inside by spotd and the trainer, whose uids exist only in the container.
        shared.chmod(0o777)
    container = Container(
        tools=tools,
        rootfs=rootfs,
        binds=[
            f"--bind-ro={wheel.parent}:/srv/dist",
            f"--bind-ro={wheelhouse}:/srv/wheels",
            f"--bind-ro={REPO / 'tests/e2e'}:/srv/e2e",
            f"--bind-ro={boot}:/srv/boot",
            f"--bind={store}:/srv/store",
            f"--bind={results}:/srv/results",
        ],
        console=tmp_path / "console.log",
    )
    started = time.monotonic()
    container.start()
    try:
        _scenario(container, wheel=wheel, boot=boot, store=store, results=results)
    except BaseException:
        print(container.diagnostics())
        raise
    finally:
        container.stop()
    print(f"container test: {time.monotonic() - started:.0f}s from boot to poweroff")


def _scenario(container: Container, *, wheel: Path, boot: Path, store: Path, results: Path) -> None:
    # pip in the container has no network: the daemon's dependencies come from the cached wheels.
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/srv/wheels"}

    # What the image brings before user-data runs: a training user whose own venv lacks spotd.
    container.run("useradd", "--create-home", TRAIN_USER)
    container.run("install", "-d", "-o", TRAIN_USER, "-g", TRAIN_USER, "/opt/venv")
    container.run("runuser", "-u", TRAIN_USER, "--", "python3.11", "-m", "venv", "/opt/venv", timeout_s=120)
    # The test's stand-ins, as a drop-in: IMDS is the simulator on loopback, the store a bind mount
    # that spotd.service's ProtectSystem=strict must be told it may write.
    container.write(
        "/etc/systemd/system/spotd-test-imds.service",
        "[Unit]\nDescription=IMDSv2 simulator of the container test\n\n"
        f"[Service]\nExecStart=/opt/spotd/bin/spotd simulate-imds --host 127.0.0.1 --port {IMDS_PORT}\n",
    )
    container.write(
        f"/etc/systemd/system/{UNIT}.d/50-e2e.conf",
        "[Unit]\nWants=spotd-test-imds.service\nAfter=spotd-test-imds.service\n\n"
        f"[Service]\nEnvironment=SPOTD_IMDS_ENDPOINT=http://127.0.0.1:{IMDS_PORT}\n"
        "ReadWritePaths=/srv/store\n",
    )

    # A bare name is refused before anything is installed.
    (boot / "unpinned.sh").write_text(render_user_data({"PIP_SPEC": "spotd"}))
    refused = container.run("bash", "/srv/boot/unpinned.sh", env=offline, check=False)
    assert refused.returncode == 1
    wait_until(
        lambda: "FATAL: SPOTD_PIP_SPEC" in container.run("cat", "/var/log/spotd-user-data.log").stdout,
        timeout_s=10,
        interval_s=0.25,
        what="user-data to log why it refused an unpinned spotd",
    )
    assert container.run("test", "-e", "/opt/spotd", check=False).returncode == 1

    # First boot: user-data with spotd pinned to this tree's wheel (a wheel path is one way to pin).
    (boot / "user-data.sh").write_text(
        render_user_data(
            {
                "STORE_URI": "file:///srv/store",
                "JOB_ID": JOB,
                "PIP_SPEC": f"/srv/dist/{wheel.name}",
                "TRAIN_CMD": "/opt/venv/bin/python /srv/e2e/container_trainer.py --name stub "
                "--events /srv/results/trainer.jsonl",
                "TRAIN_USER": TRAIN_USER,
                "TRAIN_DIR": f"/home/{TRAIN_USER}",
            }
        )
    )
    t0 = time.monotonic()
    container.run("bash", "/srv/boot/user-data.sh", env=offline, timeout_s=300)
    print(f"user-data: {time.monotonic() - t0:.0f}s")
    log = container.run("cat", "/var/log/spotd-user-data.log").stdout
    assert "training environment: /opt/venv/bin/python has spotd" in log, log
    # Installed as the venv's owner, so that user can still manage it.
    owner = container.run("sh", "-c", "stat -c %U /opt/venv/lib/python3.11/site-packages/spotd").stdout
    assert owner.strip() == TRAIN_USER

    # READY: a Type=notify unit is active/running only after READY=1.
    ready = container.show(UNIT, "ActiveState", "SubState", "Type", "MainPID", "NRestarts")
    assert (ready["Type"], ready["ActiveState"], ready["SubState"]) == ("notify", "active", "running"), ready
    # The config the unit (User=spotd) must read, and the socket group it must not chown.
    stat_config = container.run("stat", "-c", "%U:%G %a", "/etc/spotd/spotd.toml").stdout.strip()
    assert stat_config == "root:spotd 640"
    assert 'group = "spotd"' in container.run("cat", "/etc/spotd/spotd.toml").stdout
    assert container.run("stat", "-c", "%G %a", "/run/spotd/spotd.sock").stdout.strip() == "spotd 660"

    # The trainer connected through the socket, and spotd sees its real uid (no PrivateUsers).
    trainer_uid = int(container.run("id", "-u", TRAIN_USER).stdout)

    def registered() -> dict[str, Any] | None:
        done = container.run("/opt/spotd/bin/spotd", "status", "--json", check=False)
        status = json.loads(done.stdout) if done.returncode == 0 else {}
        return status if status.get("trainers") and status.get("imds_up") else None

    up = wait_until(
        registered,
        interval_s=0.25,
        timeout_s=60,
        what="the trainer to register and IMDS (the simulator) to answer",
    )
    assert [(t["name"], t["uid"]) for t in up["trainers"]] == [("stub", trainer_uid)], up["trainers"]
    assert container.run("systemctl", "is-active", TRAIN_UNIT).stdout.strip() == "active"

    # A spot interruption notice: the trainer is asked, saves, and the save is committed; the request is
    # final, so the trainer waits until it is durable and exits 0, and Restart=on-failure leaves it stopped.
    first_pid = up["trainers"][0]["pid"]
    _imds(container, "notice", '{"action": "terminate"}')
    spot = wait_until(
        lambda: [e for e in trainer_events(results) if e["event"] == "durable" and e["pid"] == first_pid],
        timeout_s=60,
        interval_s=0.25,
        what="the trainer's spot checkpoint to be durable",
    )[0]
    assert (spot["ok"], spot["reason"]) == (True, "spot-terminate"), spot
    asked = next(e for e in trainer_events(results) if e["event"] == "saved" and e["pid"] == first_pid)
    assert asked["final"] is True, asked
    manifest = commit_of(store, spot)
    assert manifest is not None, f"no commit holds {spot['path']}: {committed(store)}"
    assert manifest["reason"] == "spot-terminate"

    def exited() -> dict[str, str] | None:
        p = container.show(TRAIN_UNIT, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        return p if p["ActiveState"] in ("inactive", "failed") else None

    done = wait_until(exited, interval_s=0.25, timeout_s=30, what="the trainer to exit after its final save")
    assert (done["ActiveState"], done["Result"], done["ExecMainStatus"]) == ("inactive", "success", "0"), done
    assert trainer_events(results)[-1]["event"] == "exit"

    # The watchdog holds: pings keep arriving after a whole WatchdogSec, with no restart.
    watchdog = container.show(UNIT, "WatchdogUSec")["WatchdogUSec"]
    assert watchdog == "30s", watchdog

    def pinged_after_a_period() -> dict[str, str] | None:
        p = container.show(
            UNIT,
            "WatchdogTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
            "NRestarts",
            "MainPID",
            "ActiveState",
        )
        late = int(p["WatchdogTimestampMonotonic"]) > int(p["ActiveEnterTimestampMonotonic"]) + 30_000_000
        return p if late else None

    late = wait_until(
        pinged_after_a_period,
        interval_s=0.5,
        timeout_s=90,
        what="a watchdog ping more than WatchdogSec after READY",
    )
    assert (late["NRestarts"], late["MainPID"], late["ActiveState"]) == ("0", ready["MainPID"], "active"), (
        late
    )

    # The job again, as on the next boot, with the notice withdrawn: a trainer that only steps.
    _imds(container, "clear", "")
    container.run("systemctl", "start", TRAIN_UNIT)
    again = wait_until(
        lambda: [t for t in (registered() or {"trainers": []})["trainers"] if t["pid"] != first_pid],
        interval_s=0.25,
        timeout_s=60,
        what="the restarted trainer to register",
    )
    second_pid = again[0]["pid"]
    wait_until(
        lambda: any(e["event"] == "connected" and e["pid"] == second_pid for e in trainer_events(results)),
        interval_s=0.25,
        timeout_s=30,
        what="the restarted trainer to step",
    )

    # Poweroff, the way a spot stop ends: systemd stops the trainer first (After=spotd.service);
    # spotd.client's own SIGTERM handler turns the signal into a final request, the loop saves, the save
    # is committed by a spotd that still runs, the trainer exits 0, and only then is spotd stopped.
    code = container.poweroff(timeout_s=150)
    assert code == 0, f"systemd-nspawn exited {code}"
    events = [e for e in trainer_events(results) if e["pid"] == second_pid]
    saved = [e for e in events if e["event"] == "saved"]
    assert [(e["reason"], e["request_id"], e["final"]) for e in saved] == [
        ("sigterm", f"sigterm-{second_pid}", True)
    ], events
    (last,) = [e for e in events if e["event"] == "durable"]
    assert last["ok"], events
    manifest = commit_of(store, last)
    assert manifest is not None, f"no commit holds {last['path']}: {committed(store)}"
    assert events[-1]["event"] == "exit", events[-3:]


def _imds(container: Container, op: str, body: str) -> None:
    """POST to the IMDS simulator's control API, from inside (it listens on the container's loopback)."""
    container.run(
        "/opt/spotd/bin/python",
        "-c",
        "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
        f"'http://127.0.0.1:{IMDS_PORT}/_sim/' + sys.argv[1], data=sys.argv[2].encode(), method='POST'), "
        "timeout=10).read()",
        op,
        body,
    )
