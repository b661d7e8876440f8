"""The restore/list progress reporter."""

from __future__ import annotations

import io

from spotd.tools.progress import Progress, restore_progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_progress_is_one_throttled_line() -> None:
    """On a TTY updates redraw one line with bytes, percent, MB/s and ETA, at most ten times a second."""
    now = [0.0]
    out = Tty()
    p = Progress(total=10_000_000, label="restore", stream=out, clock=lambda: now[0])
    now[0] = 1.0
    p.update(5_000_000)
    p.update(1)  # same instant: throttled
    now[0] = 2.0
    restore_progress(p)(10_000_000, 10_000_000)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "5.0 MB / 10.0 MB (50%) 5.0 MB/s ETA 1s" in text and "(100%)" in text


def test_non_tty_progress_is_line_based() -> None:
    """Off a TTY progress writes plain lines, throttled to one per ten seconds plus the final one."""
    now = [0.0]
    out = io.StringIO()
    p = Progress(total=100, label="restore", stream=out, clock=lambda: now[0])
    for i in range(1, 100):
        now[0] = i * 0.01
        p.update(1)
    p.update(1)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2 and "(100%)" in lines[-1]
