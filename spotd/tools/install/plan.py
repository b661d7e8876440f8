"""What ``spotd install`` will write: the options checked, the config and the units rendered.

No side effects here; spotd.tools.install.actions does the writing."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Final

from spotd.config import load_config

__all__ = [
    "CONFIG_PATH",
    "DEFAULT_BIN",
    "DEFAULT_CHECKPOINT_DIR",
    "Options",
    "UsageError",
    "check_config",
    "env_quote",
    "options",
    "render_config",
    "unit_text",
]

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


def options(args: argparse.Namespace) -> Options:
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


def render_config(opts: Options) -> str:
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
        "# boot_store_wait = 300.0       # store trouble at boot retried this long; below TimeoutStartSec\n"
    )


def check_config(text: str) -> None:
    """Refuse to write a config the daemon would reject (exit 78, naming the key)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8", delete=False) as fh:
        fh.write(text)
    try:
        load_config(fh.name, environ={})
    finally:
        os.unlink(fh.name)


def unit_text(name: str, opts: Options) -> str:
    text = resources.files("spotd").joinpath("data", name).read_text(encoding="utf-8")
    text = text.replace(str(DEFAULT_BIN), str(opts.spotd_bin))
    return text.replace(DEFAULT_CHECKPOINT_DIR, opts.checkpoint_dir)


def env_quote(value: str) -> str:
    # systemd EnvironmentFile= strips one level of double quotes and honours backslash escapes inside them.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
