"""`spotd install` into a directory tree: idempotent, dry-run, never overwriting a config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from spotd.cli import main as cli_main
from spotd.config import load_config
from spotd.tools import install
from tests.util import require_tool

BASE = ["--bucket", "ckpt-bucket", "--job-id", "mono-to-3d", "--spotd-bin", "/opt/spotd/bin/spotd"]
TRAIN = [
    "--train-cmd",
    "python train.py --name 'a b'",
    "--train-user",
    "ubuntu",
    "--train-dir",
    "/home/ubuntu",
]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root with its content (or link target), mode and mtime."""
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", os.readlink(path), st.st_mtime_ns)
        elif path.is_dir():
            out[str(path.relative_to(root))] = ("dir", st.st_mode, st.st_mtime_ns)
        else:
            out[str(path.relative_to(root))] = ("file", path.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


def run(root: Path, *args: str) -> int:
    return install._standalone(["--root", str(root), *BASE, *args])


def test_second_install_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `spotd install --root` leaves every file untouched and reports unchanged/keep per item."""
    assert run(tmp_path, *TRAIN) == 0
    first = capsys.readouterr().out.splitlines()
    assert any(line.startswith("write") and "spotd.service" in line for line in first)
    before = snapshot(tmp_path)
    assert run(tmp_path, *TRAIN) == 0
    second = capsys.readouterr().out.splitlines()
    assert snapshot(tmp_path) == before
    assert len(second) == len(first)
    verbs = {line.split()[0] for line in second}
    assert verbs <= {"unchanged", "keep", "skip"}, second


def test_install_tree_contents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tree gets both units, a config from the flags, the job's env file, drop-in and enable links."""
    assert run(tmp_path, *TRAIN, "--checkpoint-dir", "/data/ckpt") == 0
    etc = tmp_path / "etc"
    service = (etc / "systemd/system/spotd.service").read_text()
    assert "ExecStart=/opt/spotd/bin/spotd run --config /etc/spotd/spotd.toml" in service
    assert "ReadWritePaths=/data/ckpt\n" in service
    assert "/opt/ml/checkpoints" not in service
    cfg = load_config(etc / "spotd/spotd.toml", environ={})
    assert (cfg.job_id, cfg.checkpoint_dir, cfg.store.uri) == (
        "mono-to-3d",
        "/data/ckpt",
        "s3://ckpt-bucket/spotd",
    )
    assert (etc / "spotd/spotd.toml").stat().st_mode & 0o777 == 0o640
    env = (etc / "spotd/train-mono-to-3d.env").read_text()
    assert env == 'TRAIN_CMD="python train.py --name \'a b\'"\nTRAIN_DIR="/home/ubuntu"\n'
    assert "User=ubuntu" in (etc / "systemd/system/spotd-train@mono-to-3d.service.d/10-user.conf").read_text()
    wants = etc / "systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "spotd.service") == "/etc/systemd/system/spotd.service"
    assert os.readlink(wants / "spotd-train@mono-to-3d.service") == "/etc/systemd/system/spotd-train@.service"
    assert (tmp_path / "data/ckpt").stat().st_mode & 0o7777 == 0o2775
    assert "u spotd" in (etc / "sysusers.d/spotd.conf").read_text()
    assert "z /etc/spotd/spotd.toml - root spotd -" in (etc / "tmpfiles.d/spotd.conf").read_text()
    assert 'group = "spotd"' in (etc / "spotd/spotd.toml").read_text()
    out = capsys.readouterr().out
    assert "skip      useradd spotd" in out


def test_dry_run_prints_every_action_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run prints one [dry-run] line per action and leaves the tree empty."""
    assert run(tmp_path, "--dry-run", *TRAIN) == 0
    lines = capsys.readouterr().out.splitlines()
    assert list(tmp_path.iterdir()) == []
    assert all(line.startswith("[dry-run] ") for line in lines)
    written = [line.split()[2] for line in lines if line.split()[1] == "write"]
    assert "/etc/systemd/system/spotd.service" in written
    assert "/etc/spotd/spotd.toml" in written
    assert any(line.split()[1] == "link" for line in lines)


def test_existing_config_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator's /etc/spotd/spotd.toml survives install byte for byte, and install says it kept it."""
    config = tmp_path / "etc/spotd/spotd.toml"
    config.parent.mkdir(parents=True)
    config.write_text('job_id = "mine"\n')
    assert run(tmp_path, "--store-uri", "s3://other/prefix") == 0
    assert config.read_text() == 'job_id = "mine"\n'
    assert any(
        line.startswith("keep") and "spotd.toml" in line for line in capsys.readouterr().out.splitlines()
    )


def test_outdated_unit_is_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A unit file that differs from the packaged one is rewritten, and the line says so."""
    assert run(tmp_path) == 0
    unit = tmp_path / "etc/systemd/system/spotd.service"
    unit.write_text("[Service]\nExecStart=/old\n")
    capsys.readouterr()
    assert run(tmp_path) == 0
    assert "replaces an older version" in capsys.readouterr().out
    assert "Type=notify" in unit.read_text()


def test_store_uri_wins_and_missing_store_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--store-uri overrides --bucket; with neither, the config is written with a warning to set it."""
    assert (
        install._standalone(["--root", str(tmp_path), "--store-uri", "file:///srv/ckpt", "--bucket", "b"])
        == 0
    )
    assert load_config(tmp_path / "etc/spotd/spotd.toml", environ={}).store.uri == "file:///srv/ckpt"
    other = tmp_path / "other"
    other.mkdir()
    capsys.readouterr()
    assert install._standalone(["--root", str(other)]) == 0
    assert "warn      store.uri" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--store-uri", "gs://bucket"], 78, "store.uri"),
        (["--job-id", "a/b"], 78, "job_id"),
        (["--checkpoint-dir", "relative/dir"], 2, "--checkpoint-dir"),
        (["--checkpoint-dir", "/has space"], 2, "--checkpoint-dir"),
        (["--job-id", "has space", "--train-cmd", "python t.py"], 2, "--job-id"),
        (["--train-cmd", "python t.py", "--train-user", "Bad User"], 2, "--train-user"),
    ],
)
def test_bad_values_exit_with_a_message_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needle: str
) -> None:
    """Bad option values exit 2, values the daemon would reject exit 78; nothing is written either way."""
    assert install._standalone(["--root", str(tmp_path), *args]) == code
    err = capsys.readouterr().err
    assert needle in err
    assert list(tmp_path.iterdir()) == []


def test_missing_root_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--root naming a directory that does not exist exits 2 and says to create it."""
    assert install._standalone(["--root", str(tmp_path / "nope")]) == 2
    assert "mkdir -p" in capsys.readouterr().err


def test_cli_install_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`spotd install --root DIR` through the CLI installs the units."""
    assert cli_main(["install", "--root", str(tmp_path), *BASE]) == 0
    assert (tmp_path / "etc/systemd/system/spotd.service").is_file()
    assert "write" in capsys.readouterr().out


def test_baked_config_gets_the_group_of_the_unit_at_boot(tmp_path: Path) -> None:
    """Under --root the config is written before the spotd group exists; the image's own boot steps (sysusers, then tmpfiles) give it group spotd, which spotd.service needs to read it."""
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown; run the tests as root (scripts/test in CI does)")
    sysusers = require_tool("systemd-sysusers", "systemd")
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    assert run(tmp_path) == 0
    config = tmp_path / "etc/spotd/spotd.toml"
    assert (config.stat().st_gid, config.stat().st_mode & 0o777) == (os.getgid(), 0o640)
    for argv in (
        [sysusers, f"--root={tmp_path}", str(tmp_path / "etc/sysusers.d/spotd.conf")],
        [tmpfiles, f"--root={tmp_path}", "--create", str(tmp_path / "etc/tmpfiles.d/spotd.conf")],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    groups = dict(line.split(":")[:3:2] for line in (tmp_path / "etc/group").read_text().splitlines())
    assert config.stat().st_gid == int(groups["spotd"])
    assert (config.stat().st_uid, config.stat().st_mode & 0o777) == (0, 0o640)
