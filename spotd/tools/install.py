"""``spotd install``: the systemd units, /etc/spotd/spotd.toml, the spotd user, and enabling the units.

Every action is printed as one line (``write``, ``unchanged``, ``keep``, ``mkdir``, ``link``, ``run``,
``skip``, ``warn``); ``--dry-run`` prints the same lines prefixed ``[dry-run]`` and changes nothing; a
second run changes nothing and says so. ``--root DIR`` installs into a directory tree (an image being
built, a test): user creation and systemctl are skipped there, the units are enabled with the same
symlinks ``systemctl enable`` makes, and a sysusers.d entry creates the user when the image boots.

The config file is written only when absent: an existing one is the operator's, never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Final

from spotd.config import load_config
from spotd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError

__all__ = ["add_arguments", "main"]

SERVICE: Final = "spotd.service"
TRAIN_TEMPLATE: Final = "spotd-train@.service"
USER: Final = "spotd"
CONFIG_PATH: Final = PurePosixPath("/etc/spotd/spotd.toml")
UNIT_DIR: Final = PurePosixPath("/etc/systemd/system")
SYSUSERS_PATH: Final = PurePosixPath("/etc/sysusers.d/spotd.conf")
TMPFILES_PATH: Final = PurePosixPath("/etc/tmpfiles.d/spotd.conf")
DEFAULT_BIN: Final = PurePosixPath("/opt/spotd/bin/spotd")
DEFAULT_CHECKPOINT_DIR: Final = "/opt/ml/checkpoints"
WANTS: Final = "multi-user.target.wants"

# systemd instance names and unit-file values: no escaping games, refuse what would need them.
_INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]+$")
_UNIT_PATH_RE: Final = re.compile(r"^/[A-Za-z0-9_./@+-]*$")
_USER_RE: Final = re.compile(r"^[a-z_][a-z0-9_-]*\$?$")

SYSUSERS_TEXT: Final = (
    "# Written by `spotd install`: systemd-sysusers creates the spotd user and group at boot.\n"
    'u spotd - "spotd checkpoint daemon" /nonexistent /usr/sbin/nologin\n'
)
# Under --root (an image build) the spotd group exists only once sysusers runs at boot, so the config
# cannot get its group at install time; systemd-tmpfiles-setup runs after systemd-sysusers and before
# spotd.service, and gives it the group the unit (Group=spotd) needs to read it. "-" keeps the mode.
TMPFILES_TEXT: Final = (
    "# Written by `spotd install`: spotd.service runs as group spotd and must read its config.\n"
    f"z {CONFIG_PATH} - root {USER} -\n"
)


class UsageError(Exception):
    """A command-line value spotd install cannot use; the message names the fix."""


@dataclass(frozen=True, slots=True)
class Options:
    root: Path | None
    dry_run: bool
    job_id: str
    checkpoint_dir: str
    store_uri: str
    spotd_bin: PurePosixPath
    train_cmd: str
    train_user: str
    train_dir: str
    start: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``spotd install`` options (``--config`` is added by the CLI and not used here: the config is
    always written to /etc/spotd/spotd.toml, the path the unit passes to ``spotd run``)."""
    g = parser.add_argument_group("install")
    g.add_argument("--root", metavar="DIR", help="install into this directory tree; no useradd or systemctl")
    g.add_argument("--dry-run", action="store_true", help="print every action and change nothing")
    g.add_argument("--bucket", help="S3 bucket for checkpoints; store.uri becomes s3://BUCKET/spotd")
    g.add_argument(
        "--store-uri",
        metavar="URI",
        help="store.uri (s3://bucket/prefix or file:///path); wins over --bucket",
    )
    g.add_argument("--job-id", default="default", help="job_id: stable across instances (default: default)")
    g.add_argument(
        "--checkpoint-dir",
        default=DEFAULT_CHECKPOINT_DIR,
        help=f"checkpoint_dir the trainer saves into (default: {DEFAULT_CHECKPOINT_DIR})",
    )
    g.add_argument(
        "--spotd-bin",
        metavar="PATH",
        help=f"the spotd executable the unit runs (default: beside this Python, else {DEFAULT_BIN})",
    )
    g.add_argument(
        "--train-cmd",
        metavar="CMD",
        help="the training command; writes /etc/spotd/train-JOB.env and enables spotd-train@JOB",
    )
    g.add_argument("--train-user", default="root", help="user the training job runs as (default: root)")
    g.add_argument("--train-dir", default="/", help="working directory of the training job (default: /)")
    g.add_argument("--now", action="store_true", help="also start the enabled units (not under --root)")


def main(args: argparse.Namespace) -> int:
    try:
        opts = _options(args)
        config_text = _render_config(opts)
        _check_config(config_text)
    except UsageError as exc:
        print(f"spotd install: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"spotd install: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if opts.root is None and not opts.dry_run and os.geteuid() != 0:
        print(
            "spotd install: needs root to write /etc and create the spotd user; run it with sudo, "
            "or use --root DIR to install into a tree, or --dry-run to see the plan",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    installer = _Installer(opts=opts, out=print)
    try:
        installer.run(config_text)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"spotd install: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _options(args: argparse.Namespace) -> Options:
    root = Path(args.root).resolve() if args.root else None
    if root is not None and not root.is_dir():
        raise UsageError(f"--root {args.root} is not a directory; create it first (mkdir -p {args.root})")
    checkpoint_dir = str(args.checkpoint_dir)
    if not _UNIT_PATH_RE.match(checkpoint_dir) or "//" in checkpoint_dir:
        raise UsageError(
            f"--checkpoint-dir {checkpoint_dir!r} must be an absolute path of letters, digits and "
            "'_./@+-' (it goes into a unit file); pick e.g. /opt/ml/checkpoints"
        )
    if args.spotd_bin:
        spotd_bin = PurePosixPath(args.spotd_bin)
    else:
        beside = Path(sys.executable).parent / "spotd"
        spotd_bin = PurePosixPath(beside) if root is None and beside.is_file() else DEFAULT_BIN
    if not _UNIT_PATH_RE.match(str(spotd_bin)):
        raise UsageError(f"--spotd-bin {str(spotd_bin)!r} must be an absolute path without spaces or '%'")
    job_id = str(args.job_id)
    train_cmd = str(args.train_cmd or "").strip()
    if train_cmd:
        if not _INSTANCE_RE.match(job_id):
            raise UsageError(
                f"--job-id {job_id!r} names the unit spotd-train@JOB.service; use letters, digits, "
                "'-', '_', '.' or ':'"
            )
        if not _USER_RE.match(args.train_user):
            raise UsageError(
                f"--train-user {args.train_user!r} is not a user name; give an existing user such "
                "as ubuntu or ec2-user"
            )
        if not _UNIT_PATH_RE.match(args.train_dir):
            raise UsageError(f"--train-dir {args.train_dir!r} must be an absolute path without spaces")
        if "\n" in train_cmd:
            raise UsageError("--train-cmd must be one line; put a longer script in a file and run that")
    store_uri = str(args.store_uri or (f"s3://{args.bucket}/spotd" if args.bucket else ""))
    return Options(
        root=root,
        dry_run=bool(args.dry_run),
        job_id=job_id,
        checkpoint_dir=checkpoint_dir,
        store_uri=store_uri,
        spotd_bin=spotd_bin,
        train_cmd=train_cmd,
        train_user=str(args.train_user),
        train_dir=str(args.train_dir),
        start=bool(args.now),
    )


def _toml_str(value: str) -> str:
    # A TOML basic string is a JSON string as long as every non-ASCII character is \u-escaped.
    return json.dumps(value, ensure_ascii=True)


def _render_config(opts: Options) -> str:
    store_line = f"uri = {_toml_str(opts.store_uri)}"
    if not opts.store_uri:
        store_line += "  # REQUIRED before spotd starts: s3://bucket/prefix, or set SPOTD_STORE_URI"
    return (
        "# spotd configuration, written once by `spotd install` (it never overwrites this file).\n"
        "# Any key can be overridden by SPOTD_<SECTION>_<KEY> in the environment; unknown keys are errors.\n"
        f"job_id = {_toml_str(opts.job_id)}\n"
        f"checkpoint_dir = {_toml_str(opts.checkpoint_dir)}\n"
        "\n[store]\n"
        f"{store_line}\n"
        "# keep = 3                      # committed checkpoints kept in the store\n"
        "\n[imds]\n"
        '# endpoint = "http://169.254.169.254"   # "http://[fd00:ec2::254]" on IPv6-only subnets\n'
        "\n[socket]\n"
        'path = "/run/spotd/spotd.sock"  # RuntimeDirectory of spotd.service\n'
        'group = "spotd"                # Group= of spotd.service; trainers need it (SupplementaryGroups=)\n'
        "\n[metrics]\n"
        'listen = "0.0.0.0:9127"        # scraped by Prometheus (docs/prometheus-scrape.yml)\n'
        "\n[policy]\n"
        '# on_rebalance = "checkpoint"   # checkpoint | notify | ignore\n'
        "# shutdown_grace = 30.0         # keep below TimeoutStopSec=90s of spotd.service\n"
    )


def _check_config(text: str) -> None:
    """Refuse to write a config the daemon would reject (exit 78, naming the key)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8", delete=False) as fh:
        fh.write(text)
    try:
        load_config(fh.name, environ={})
    finally:
        os.unlink(fh.name)


def _unit_text(name: str, opts: Options) -> str:
    text = resources.files("spotd").joinpath("data", name).read_text(encoding="utf-8")
    text = text.replace(str(DEFAULT_BIN), str(opts.spotd_bin))
    return text.replace(DEFAULT_CHECKPOINT_DIR, opts.checkpoint_dir)


def _env_quote(value: str) -> str:
    # systemd EnvironmentFile= strips one level of double quotes and honours backslash escapes inside them.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Installer:
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
        self._write(UNIT_DIR / SERVICE, _unit_text(SERVICE, o), mode=0o644, unit=True)
        self._write(UNIT_DIR / TRAIN_TEMPLATE, _unit_text(TRAIN_TEMPLATE, o), mode=0o644, unit=True)
        self._write_once(CONFIG_PATH, config_text, mode=0o640)
        if not o.store_uri:
            self._say(
                "warn", "store.uri", f"empty: set it in {CONFIG_PATH} (or SPOTD_STORE_URI) before starting"
            )
        self._checkpoint_dir()
        units = [SERVICE]
        if o.train_cmd:
            train_unit = f"spotd-train@{o.job_id}.service"
            env = f"TRAIN_CMD={_env_quote(o.train_cmd)}\nTRAIN_DIR={_env_quote(o.train_dir)}\n"
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


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotd.tools.install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
