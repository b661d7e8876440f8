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
import os
import subprocess
import sys
from collections.abc import Sequence

from spotd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError
from spotd.tools.install.actions import Installer
from spotd.tools.install.plan import (
    DEFAULT_BIN,
    DEFAULT_CHECKPOINT_DIR,
    UsageError,
    check_config,
    options,
    render_config,
)

__all__ = ["add_arguments", "main"]


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
        opts = options(args)
        config_text = render_config(opts)
        check_config(config_text)
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
    installer = Installer(opts=opts, out=print)
    try:
        installer.run(config_text)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"spotd install: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _standalone(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotd.tools.install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))
