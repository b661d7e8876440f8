"""What ``spotd install`` does to the machine (or to a ``--root`` tree), one printed line per action."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from spotd.tools.install.plan import (
    CONFIG_PATH,
    SERVICE,
    SYSUSERS_PATH,
    SYSUSERS_TEXT,
    TMPFILES_PATH,
    TMPFILES_TEXT,
    TRAIN_TEMPLATE,
    UNIT_DIR,
    USER,
    WANTS,
    Options,
    env_quote,
    unit_text,
)

__all__ = ["Installer"]


class Installer:
    __slots__ = ("_opts", "_out", "_units_changed")

    def __init__(self, *, opts: Options, out: Callable[[str], None]) -> None:
        self._opts = opts
        self._out = out
        self._units_changed = False

    # -- paths and output ---------------------------------------------------------------------------
    def _path(self, target: PurePosixPath | str) -> Path:
        target = PurePosixPath(target)
        if self._opts.root is None:
            return Path(target)
        return self._opts.root / target.relative_to("/")

    def _say(self, verb: str, target: object, detail: str = "") -> None:
        prefix = "[dry-run] " if self._opts.dry_run else ""
        line = f"{prefix}{verb:<10}{target}"
        self._out(f"{line}  ({detail})" if detail else line)

    @property
    def _live(self) -> bool:
        return self._opts.root is None

    # -- the plan -------------------------------------------------------------------------------------
    def run(self, config_text: str) -> None:
        o = self._opts
        if o.root is not None:
            self._say("skip", f"useradd {USER}", f"--root: {SYSUSERS_PATH} creates it when the image boots")
        else:
            self._ensure_user()
        self._write(SYSUSERS_PATH, SYSUSERS_TEXT, mode=0o644)
        self._write(TMPFILES_PATH, TMPFILES_TEXT, mode=0o644)
        self._write(UNIT_DIR / SERVICE, unit_text(SERVICE, o), mode=0o644, unit=True)
        self._write(UNIT_DIR / TRAIN_TEMPLATE, unit_text(TRAIN_TEMPLATE, o), mode=0o644, unit=True)
        self._write_once(CONFIG_PATH, config_text, mode=0o640)
        if not o.store_uri:
            self._say(
                "warn", "store.uri", f"empty: set it in {CONFIG_PATH} (or SPOTD_STORE_URI) before starting"
            )
        self._checkpoint_dir()
        units = [SERVICE]
        if o.train_cmd:
            train_unit = f"spotd-train@{o.job_id}.service"
            env = f"TRAIN_CMD={env_quote(o.train_cmd)}\nTRAIN_DIR={env_quote(o.train_dir)}\n"
            self._write_once(PurePosixPath(f"/etc/spotd/train-{o.job_id}.env"), env, mode=0o640)
            dropin = f"# Written by `spotd install --train-user`.\n[Service]\nUser={o.train_user}\n"
            self._write(UNIT_DIR / f"{train_unit}.d" / "10-user.conf", dropin, mode=0o644, unit=True)
            units.append(train_unit)
            if self._live and not _user_exists(o.train_user):
                self._say("warn", f"user {o.train_user}", f"does not exist; {train_unit} fails until it does")
        else:
            self._say(
                "skip", "spotd-train@JOB.service", "no --train-cmd: enable your own job unit After=spotd"
            )
        self._reload()
        for unit in units:
            self._enable(unit)
        if o.start:
            if not self._live:
                self._say("skip", f"systemctl start {' '.join(units)}", "--root: nothing runs in a tree")
            elif not _systemd_running():
                self._say("skip", f"systemctl start {' '.join(units)}", "systemd is not running")
            else:
                self._run(["systemctl", "start", *units])

    # -- steps ----------------------------------------------------------------------------------------
    def _write(self, target: PurePosixPath, text: str, *, mode: int, unit: bool = False) -> None:
        path = self._path(target)
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current == text:
            self._say("unchanged", target)
            return
        self._say("write", target, "new" if current is None else "replaces an older version")
        if unit:
            self._units_changed = True
        if not self._opts.dry_run:
            _atomic_write(path, text, mode=mode)

    def _write_once(self, target: PurePosixPath, text: str, *, mode: int) -> None:
        path = self._path(target)
        if path.exists():
            self._say("keep", target, "exists; install never overwrites it, edit it instead")
            return
        self._say("write", target, "new")
        if self._opts.dry_run:
            return
        _atomic_write(path, text, mode=mode)
        if self._live:
            # The daemon runs as spotd and must read its config; others need not.
            self._chown(path, group=USER)

    def _checkpoint_dir(self) -> None:
        target = PurePosixPath(self._opts.checkpoint_dir)
        path = self._path(target)
        if path.is_dir():
            self._say("unchanged", target, "exists; spotd.service's ExecStartPre keeps its owner and mode")
            return
        self._say("mkdir", target, "spotd:spotd 2775, shared with the trainer through the spotd group")
        if self._opts.dry_run:
            return
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o2775)
        if self._live:
            self._chown(path, user=USER, group=USER)

    def _ensure_user(self) -> None:
        try:
            grp.getgrnam(USER)
            self._say("unchanged", f"group {USER}")
        except KeyError:
            self._run(["groupadd", "--system", USER])
        try:
            pwd.getpwnam(USER)
            self._say("unchanged", f"user {USER}")
        except KeyError:
            self._run(
                [
                    "useradd",
                    "--system",
                    "--gid",
                    USER,
                    "--home-dir",
                    "/nonexistent",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    USER,
                ]
            )

    def _reload(self) -> None:
        if not self._live:
            self._say(
                "skip", "systemctl daemon-reload", "--root: the tree's systemd loads units when it boots"
            )
        elif not self._units_changed:
            self._say("unchanged", "systemctl daemon-reload", "no unit file changed")
        elif not _systemd_running():
            self._say(
                "skip", "systemctl daemon-reload", "systemd is not running (/run/systemd/system missing)"
            )
        else:
            self._run(["systemctl", "daemon-reload"])

    def _enable(self, unit: str) -> None:
        if self._live and _systemd_running():
            state = subprocess.run(
                ["systemctl", "is-enabled", unit], capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
            if state == "enabled":
                self._say("unchanged", f"systemctl enable {unit}", "already enabled")
            else:
                self._run(["systemctl", "enable", unit])
            return
        # What `systemctl enable` does for WantedBy=multi-user.target, without a running systemd.
        link = UNIT_DIR / WANTS / unit
        template = re.sub(r"@[^.]+\.service$", "@.service", unit)
        target = str(UNIT_DIR / template)
        path = self._path(link)
        if path.is_symlink() and os.readlink(path) == target:
            self._say("unchanged", link, f"-> {target}")
            return
        self._say("link", link, f"-> {target}")
        if not self._opts.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                path.unlink()
            path.symlink_to(target)

    # -- helpers --------------------------------------------------------------------------------------
    def _run(self, argv: Sequence[str]) -> None:
        self._say("run", " ".join(argv))
        if self._opts.dry_run:
            return
        if shutil.which(argv[0]) is None:
            raise FileNotFoundError(f"{argv[0]} not found on PATH; install it or run the step by hand")
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise subprocess.SubprocessError(
                f"{' '.join(argv)} exited {done.returncode}: {detail[-1] if detail else 'no output'}"
            )

    def _chown(self, path: Path, *, user: str | None = None, group: str) -> None:
        try:
            shutil.chown(path, user=user, group=group)
        except (LookupError, PermissionError) as exc:
            self._say("warn", path, f"chown {user or ''}:{group} failed ({exc}); fix ownership by hand")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _systemd_running() -> bool:
    # sd_booted(3): the directory exists only when systemd is PID 1.
    return Path("/run/systemd/system").is_dir()


def _atomic_write(path: Path, text: str, *, mode: int) -> None:
    """Readers (systemd, the daemon) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
