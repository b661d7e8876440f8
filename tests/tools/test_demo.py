"""`spotd demo`: the whole story (simulator, moto, daemon, example trainer) in one command, as a user runs it."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures.daemon import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # TMPDIR inside tmp_path: whatever the demo leaves behind (files, processes) is findable by that path.
    return subprocess.run(
        [sys.executable, "-m", "spotd", "demo", *args],
        cwd=ROOT,
        env=subprocess_env({"TMPDIR": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def row(output: str, label: str) -> str:
    """The value of the table row whose label starts with ``label`` (the wording after it may change)."""
    match = re.search(rf"^  {re.escape(label)}.*?  +(\S.*)$", output, re.MULTILINE)
    assert match, f"no table row {label!r} in:\n{output}"
    return match.group(1).strip()


def test_demo_exits_0_with_the_table_and_nothing_lost(tmp_path: Path) -> None:
    """`spotd demo` interrupts, restores and resumes the example, prints the figures table and "nothing was lost", exits 0 and leaves nothing behind."""
    seed = random.randrange(1_000_000)
    out = run_demo(tmp_path, "--seed", str(seed))
    shown = f"seed {seed}, exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert out.returncode == 0, shown
    assert "nothing was lost." in out.stdout, shown
    assert re.fullmatch(r"\d+\.\d ms", row(out.stdout, "detection")), shown
    for label in ("checkpoint (", "upload", "notice seen → durable"):
        assert re.fullmatch(r"\d+\.\d{3} s", row(out.stdout, label)), shown
    assert int(row(out.stdout, "checkpoint bytes").replace(",", "")) > 0, shown
    stopped = int(row(out.stdout, "steps done before"))
    assert 100 < stopped < 300, "interrupted after the first periodic checkpoint, before the end"
    assert int(row(out.stdout, "step resumed from")) == stopped, shown
    assert row(out.stdout, "lost steps") == "0", shown
    assert row(out.stdout, "final weights") == "yes, bit for bit", shown
    assert list(tmp_path.glob("spotd-demo-*")) == [], "the demo removes its temporary directory"
    assert processes_mentioning(str(tmp_path)) == [], "the demo stops every process it started"


def test_demo_that_cannot_interrupt_training_exits_1_and_says_why(tmp_path: Path) -> None:
    """With too few steps to interrupt, `spotd demo` exits 1 and names the fix instead of claiming success."""
    out = run_demo(tmp_path, "--steps", "50", "--seed", "0")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "nothing was lost" not in out.stdout
    assert "--steps" in out.stderr, out.stderr
    assert processes_mentioning(str(tmp_path)) == []
